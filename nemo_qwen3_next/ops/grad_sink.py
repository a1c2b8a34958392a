"""Column views of one GEMM output whose gradients are written into one buffer (no gradient ``cat``).

The GDN's in_proj is one GEMM ``[N, H] x [H, C]`` whose output columns are q, k, v, z, b and a. As one
GEMM (instead of one per piece) its forward, input gradient and weight gradient are each a single large
GEMM, without the per-piece ``addmm_`` accumulations of the input gradient. But the pieces' gradients
come from different kernels (three convs, the gated norm, the gate glue); joining them with a ``cat``
would copy the whole ``[N, C]`` gradient once more. So `column_views` hands out the pieces as views of
the output together with a `GradSink`: a kernel whose input is such a view may write its input gradient
straight into the view's place in the sink's buffer (`GradSink.slot`), and the views' backward returns
that buffer. A gradient that arrives anywhere else (a kernel that ignores the sink, the torch references,
autograd summing two uses) is copied into its place, so the result is right whoever wrote what.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

from .usage import record

__all__ = ["GradSink", "column_views"]


class GradSink:
    """The gradient buffer of one ``[N, C]`` tensor, allocated by its first writer in the backward.

    Holds the base's geometry (not the base), so a kernel can find where the gradient of any view of it
    goes: `slot` is the buffer seen through the view's shape, strides and offset.
    """

    def __init__(self, base: torch.Tensor):
        self.shape, self.stride, self.dtype, self.device = base.shape, base.stride(), base.dtype, base.device
        self.ptr, self.offset = base.untyped_storage().data_ptr(), base.storage_offset()
        self.buf: Optional[torch.Tensor] = None

    def holds(self, view: torch.Tensor) -> bool:
        """Whether ``view`` is a view of the base (same storage), so `slot` can place its gradient."""
        return view.untyped_storage().data_ptr() == self.ptr and view.dtype == self.dtype

    def slot(self, view: torch.Tensor) -> torch.Tensor:
        """Where the gradient of ``view`` (a view of the base: `holds`) goes: an uninitialised view of the buffer
        with ``view``'s geometry. The caller must write every element of it."""
        if not self.holds(view):
            raise ValueError("GradSink.slot: the tensor is not a view of the sink's base")
        if self.buf is None:
            self.buf = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device)
        return self.buf.as_strided(view.shape, view.stride(), self.buf.storage_offset() + view.storage_offset() - self.offset)

    def take(self) -> Optional[torch.Tensor]:
        buf, self.buf = self.buf, None
        return buf


def sink_slot_or_empty(sink: Optional[GradSink], x: torch.Tensor) -> torch.Tensor:
    """``sink.slot(x)`` where ``x`` is a view of the sink's base, else ``torch.empty_like(x)``: the input gradient
    buffer of a kernel that may take a sink."""
    return sink.slot(x) if sink is not None and sink.holds(x) else torch.empty_like(x)


class _ColumnViews(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base, sizes, sink):
        ctx.sizes, ctx.sink = sizes, sink
        ctx.set_materialize_grads(False)
        out, o = [], 0
        for n in sizes:
            out.append(base.narrow(-1, o, n))
            o += n
        return tuple(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        sink = ctx.sink
        buf = sink.take()
        if buf is None:  # nobody wrote into the sink (every piece's kernel ignored it)
            ref = next((g for g in grads if g is not None), None)
            if ref is None:
                return None, None, None
            buf = torch.empty_strided(sink.shape, sink.stride, dtype=sink.dtype, device=ref.device)
        o, in_place = 0, 0
        for n, g in zip(ctx.sizes, grads):
            dst = buf.narrow(-1, o, n)
            o += n
            if g is None:
                dst.zero_()
            elif g.data_ptr() == dst.data_ptr() and g.stride() == dst.stride() and g.shape == dst.shape:
                in_place += 1
            else:
                dst.copy_(g)  # written elsewhere: into its place
        record("column_views_grad", f"{in_place}/{len(ctx.sizes)} in place")  # kernels_used() shows what was copied
        return buf, None, None


def column_views(base: torch.Tensor, sizes: Sequence[int]) -> Tuple[GradSink, Tuple[torch.Tensor, ...]]:
    """``base [..., C]`` split along its last dim into views of ``sizes`` columns, and their `GradSink`.

    Pass the sink to the kernels that consume the views (`causal_conv1d(..., grad_sink=)`,
    `gated_rms_norm(..., gate_grad_sink=)`); the views' backward returns the sink's buffer as ``base``'s
    gradient. Do not modify the views in place (autograd forbids it for a custom function's views).
    """
    if sum(sizes) != base.shape[-1]:
        raise ValueError(f"column_views: sizes {list(sizes)} must add up to the last dim {base.shape[-1]}")
    if not base.is_contiguous():
        raise ValueError("column_views: the base must be contiguous (the sink's buffer takes its layout)")
    sink = GradSink(base)
    return sink, _ColumnViews.apply(base, tuple(sizes), sink)
