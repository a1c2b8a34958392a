"""`ops.grad_sink.column_views`: the views' gradient is the one buffer their consumers wrote into, and right
whoever wrote what (checked against plain ``narrow`` autograd on the same graph, fp64 on CPU)."""

from __future__ import annotations

import pytest
import torch

from nemo_qwen3_next.ops.grad_sink import column_views, sink_slot_or_empty
from nemo_qwen3_next.ops.usage import kernels_used, reset


class _ScaleIntoSink(torch.autograd.Function):
    """y = c * x, whose backward writes dx into x's place in the sink (as our conv and norm kernels do)."""

    @staticmethod
    def forward(ctx, x, c, sink):
        ctx.c, ctx.sink, ctx.x = c, sink, x.detach()
        return x * c

    @staticmethod
    def backward(ctx, g):
        dx = sink_slot_or_empty(ctx.sink, ctx.x)
        dx.copy_(g * ctx.c)
        return dx, None, None


def _graph(base, sizes, use_sink):
    """Four pieces: two through the sink-writing op (one of them [s, b]-transposed as the GDN's seq-first path
    views it), one through plain torch ops, one used twice (autograd sums); the last piece unused."""
    if use_sink:
        sink, (p0, p1, p2, p3, p4) = column_views(base, sizes)
    else:
        sink, (p0, p1, p2, p3, p4) = None, torch.split(base, sizes, dim=-1)
    op = _ScaleIntoSink.apply if use_sink else (lambda x, c, _s: x * c)
    s, b = 3, 2
    y0 = op(p0.view(s, b, -1).transpose(0, 1), 2.0, sink)
    y1 = op(p1, -3.0, sink)
    y2 = p2.sin()
    y3 = op(p3, 0.5, sink) + p3.square()
    return (y0.sum(), (y1 * torch.arange(y1.numel(), dtype=y1.dtype).view_as(y1)).sum(), y2.sum(), y3.sum())


def test_column_views_gradient_equals_plain_split():
    torch.manual_seed(0)
    sizes = (4, 3, 5, 2, 6)
    base0 = torch.randn(6, sum(sizes), dtype=torch.float64)
    grads = []
    for use_sink in (True, False):
        w = base0.clone().requires_grad_(True)
        reset()
        sum(_graph(w * 1.0, sizes, use_sink)).backward()
        grads.append(w.grad)
        if use_sink:  # p0, p1 written in place; p2 copied; p3 summed by autograd (in place or not); p4 zeroed
            assert {"column_views_grad:2/5 in place", "column_views_grad:3/5 in place"} & set(kernels_used()), \
                kernels_used()
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)
    assert (grads[0][:, -6:] == 0).all()


def test_column_views_named_errors():
    with pytest.raises(ValueError, match=r"column_views: sizes \[2, 3\] must add up to the last dim 6"):
        column_views(torch.zeros(2, 6), (2, 3))
    with pytest.raises(ValueError, match="column_views: the base must be contiguous"):
        column_views(torch.zeros(6, 4).t(), (2, 4))
    sink, _ = column_views(torch.zeros(2, 6), (2, 4))
    with pytest.raises(ValueError, match="not a view of the sink's base"):
        sink.slot(torch.zeros(2, 2))
