"""The fused GDN path's planar layout (`GatedDeltaNet._forward_fused`), checked on CPU in fp32.

In the fused path, in_proj runs as one GEMM on a planar weight whose output pieces are column views (with our
kernels, `ops.grad_sink`), or as five GEMMs on weight pieces, both copied by `_PlanarPieces` out of the
per-key-head layout, and the conv runs once each on q, k and v. These tests check that this is the
reference math, by running the fused path with the torch ops (`backend="torch"`) against
`_forward_reference` on the same weights: output, input gradient and every parameter gradient. They
also check `_PlanarPieces` alone against the `index_select` row gather it replaces, forward and
backward, bitwise.
"""

from __future__ import annotations

import pytest
import torch

from nemo_qwen3_next.modules.gated_delta_net import _PlanarPieces, _planar_layout


@pytest.fixture(scope="module")
def layer():
    from megatron.core.transformer.spec_utils import build_module

    from nemo_qwen3_next.config import qwen3_next_tiny_5m
    from nemo_qwen3_next.model import init_distributed
    from nemo_qwen3_next.spec import get_qwen3_next_layer_spec

    init_distributed()
    cfg = qwen3_next_tiny_5m(hidden_size=32, linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=8,
                             linear_value_head_dim=4, linear_attention_chunk_size=8,
                             params_dtype=torch.float32, bf16=False)
    spec = get_qwen3_next_layer_spec(cfg, backend="local").submodules.linear_attention
    torch.manual_seed(0)
    m = build_module(spec, config=cfg, layer_number=1)
    m.backend = m.out_norm.backend = "torch"  # forward() would route this to the reference: call the paths directly
    with torch.no_grad():  # every parameter non-trivial, so a mixed-up channel shows in its gradient
        m.out_norm.weight.add_(0.1 * torch.randn_like(m.out_norm.weight))
        m.dt_bias.add_(0.5 * torch.randn_like(m.dt_bias))
    assert m._direct_in_proj_ok()
    return m


def _rows(layout, Hk, G):
    """The row indices of ``w [Hk*G, *]`` that `_PlanarPieces` gives for each piece, by definition."""
    return [torch.tensor([j * G + o + c for o, n in piece for j in range(Hk) for c in range(n)]) for piece in layout]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", ["in_proj", "conv"])
def test_planar_pieces_equal_index_select_bitwise(layer, which, dtype):
    Hk = layer.num_key_heads
    sizes = layer.group_split if which == "in_proj" else layer.group_split[:3]
    layout = layer._proj_layout if which == "in_proj" else layer._conv_layout
    G, rest = sum(sizes), ((5,) if which == "in_proj" else (3, 4))
    w = torch.randn(Hk * G, *rest, dtype=dtype)
    rows = _rows(layout, Hk, G)
    grads = [torch.randn(len(r), *rest, dtype=dtype) for r in rows]

    w1 = w.clone().requires_grad_(True)
    pieces = _PlanarPieces.apply(w1.view(Hk, G, *rest), layout)
    torch.autograd.backward(pieces, grads)
    w2 = w.clone().requires_grad_(True)
    gathered = [w2.index_select(0, r) for r in rows]
    torch.autograd.backward(gathered, grads)

    for p, g in zip(pieces, gathered):
        assert p.is_contiguous() and torch.equal(p, g)
    assert torch.equal(w1.grad, w2.grad)
    if which == "in_proj":  # z_all, then [b_all | a_all]: the row order generation reads in_proj's output with
        assert torch.equal(torch.cat(pieces[3:]), w.index_select(0, layer._in_proj_rows(w.device)[1]))


def test_planar_pieces_unused_piece_gets_zero_grad(layer):
    Hk, G = layer.num_key_heads, sum(layer.group_split)
    w = torch.randn(Hk * G, 5, requires_grad=True)
    q, k, v, z, ba = _PlanarPieces.apply(w.view(Hk, G, 5), layer._proj_layout)
    (q.sum() + z.sum() + ba.sum()).backward()
    expect = torch.zeros(Hk, G, 5)
    dk = layer.key_head_dim
    expect[:, :dk] = 1
    expect[:, layer.conv_group:] = 1
    assert torch.equal(w.grad.view(Hk, G, 5), expect)


def test_planar_layout_must_take_every_group_once():
    with pytest.raises(ValueError, match="take each of the 3 column groups once"):
        _planar_layout([4, 4, 8], ((0,), (2,)))


def _max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _run(layer, path, x, cu_seqlens):
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    y, bias = path(x, cu_seqlens)
    assert bias is None
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    (y * probe).sum().backward()
    return y.detach(), {"x": x.grad, **{n: p.grad.clone() for n, p in layer.named_parameters()}}


@pytest.mark.parametrize("case", ["b1", "b2", "packed", "b2-recompute", "b2-module-gemm", "b2-seq-first",
                                  "b2-seq-first-recompute", "b2-seq-first-five-gemms", "b1-own", "b1-own-recompute"])
def test_fused_path_equals_reference(layer, case, monkeypatch):
    """b2-seq-first: the planar path as it runs with our kernels (QWEN3_NEXT_OWN_KERNELS=1): one in_proj GEMM
    whose sequence-first output q, k, v, z, b, a are column views (`grad_sink`), the convs reading strided rows,
    z and the norm's output [b, s] views of [s, b] memory; five-gemms: QWEN3_NEXT_ONE_IN_PROJ_GEMM=0 (one GEMM
    per weight piece); b1-own: our kernels' path at b = 1 (one GEMM, batch-first rows)."""
    from nemo_qwen3_next.ops import own_kernels

    monkeypatch.setattr(own_kernels, "enabled", lambda: "seq-first" in case or "own" in case)
    monkeypatch.setattr(own_kernels, "ONE_IN_PROJ_GEMM", "0" if "five-gemms" in case else "1")
    torch.manual_seed(1)
    b, T, cu = (1, 40, None) if case.startswith("b1") or case == "packed" else (2, 24, None)
    if case == "packed":  # three documents; the conv history and the state restart at each boundary
        cu = torch.tensor([0, 11, 12, 40], dtype=torch.int32)
    x = torch.randn(T, b, layer.config.hidden_size)
    layer.train()
    layer.split_in_proj = case != "b2-module-gemm"  # False: the in_proj-module GEMM, split and cat, one conv
    layer.config.linear_attention_recompute = case.endswith("recompute")
    from nemo_qwen3_next.ops.usage import kernels_used, reset

    reset()
    try:
        y, g = _run(layer, layer._forward_fused, x, cu)
        one_gemm = any(k.startswith("column_views_grad:") for k in kernels_used())
        assert one_gemm == (("seq-first" in case and "five-gemms" not in case) or "own" in case), kernels_used()
    finally:
        layer.split_in_proj, layer.config.linear_attention_recompute = True, False
    y_ref, g_ref = _run(layer, layer._forward_reference, x, cu)
    assert _max_rel(y, y_ref) <= 1e-5
    assert g.keys() == g_ref.keys() and len(g) == 7
    for name in g_ref:
        assert _max_rel(g[name], g_ref[name]) <= 1e-5, name
