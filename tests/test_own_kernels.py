"""Our Triton kernels (`ops.causal_conv1d_triton`, `ops.gated_rms_norm_triton`) on the CPU, through
Triton's interpreter (``TRITON_INTERPRET=1``, in a child process: the switch is read when the kernels
are built), against the plain-torch references in float64; and their dispatch rules
(`ops.own_kernels`). The bf16 GPU runs are in `test_gpu_speed_paths.py`."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from nemo_qwen3_next.ops import causal_conv1d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent(
    """
    import torch
    from nemo_qwen3_next.ops.causal_conv1d import causal_conv1d_ref
    from nemo_qwen3_next.ops.causal_conv1d_triton import _CausalConv1dTriton

    torch.manual_seed(0)
    worst = 0.0
    # (B, T, D, W, bias, silu, row-strided input, L2-norm head dim): T below, at and off the 32-step program
    # length; the fused per-head L2-norm (the GDN's q/k) with heads inside one channel block or spanning it
    for B, T, D, W, bias, silu, strided, hd in [
            (2, 37, 48, 4, True, True, False, None), (1, 70, 300, 4, False, True, True, None),
            (2, 33, 16, 3, True, False, False, None), (1, 3, 8, 2, False, True, False, None),
            (3, 64, 130, 4, False, False, True, None), (2, 40, 24, 4, True, True, "seq", None),
            (2, 37, 48, 4, False, True, "seq", 16), (1, 35, 256, 4, False, True, False, 128),
            (2, 9, 64, 3, True, False, True, 32)]:
        if strided == "seq":  # a [b, s] view of [s, b] memory, as the GDN's sequence-first path hands it over
            x = torch.randn(T, B, D, requires_grad=True)
            xin = x.transpose(0, 1)
        else:
            x = torch.randn(B, T, 2 * D if strided else D, requires_grad=True)  # fp32: what the kernel reads
            xin = x[..., :D]  # strided rows when `strided` (the kernel takes any row stride)
        w = torch.randn(D, W, requires_grad=True)
        b = torch.randn(D, requires_grad=True) if bias else None
        leaves = [x, w] + ([b] if bias else [])
        gy = torch.randn(B, T, D)
        y = _CausalConv1dTriton.apply(xin, w, b, silu, hd or 0)
        got = [y] + list(torch.autograd.grad(y, leaves, gy))
        gx = torch.autograd.grad(_CausalConv1dTriton.apply(xin, w, b, silu, hd or 0), xin, gy)[0]
        assert gx.stride() == torch.empty_like(xin).stride(), (gx.stride(), xin.stride())  # dx in x's layout
        yr, _ = causal_conv1d_ref(xin.double(), w.double(), None if b is None else b.double(), "silu" if silu else None,
                                  l2norm_head_dim=hd)
        want = [yr] + list(torch.autograd.grad(yr, leaves, gy.double()))
        for g, r in zip(got, want):
            worst = max(worst, ((g.double() - r.double()).norm() / r.double().norm()).item())
    print("WORST", worst)
    """
)

NORM_CHILD = textwrap.dedent(
    """
    import torch
    from nemo_qwen3_next.ops.gated_rms_norm import gated_rms_norm_ref
    from nemo_qwen3_next.ops.gated_rms_norm_triton import _GatedRMSNormTriton

    torch.manual_seed(0)
    worst = 0.0
    # [B, S, H, D]; z (and so the output) sequence-first as in the GDN's seq-first path, or like x;
    # D off a power of two (masked lanes) and rows not a multiple of the 16 a program takes
    # ("slice": z a non-dense slice of a wider tensor, so the output comes back contiguous)
    for B, S, H, D, zlay in [(2, 5, 3, 16, "seq"), (1, 7, 4, 32, "same"), (3, 4, 2, 8, "seq"), (2, 3, 5, 12, "seq"),
                             (2, 4, 3, 8, "slice")]:
        x = torch.randn(B, S, H, D, requires_grad=True)
        if zlay == "seq":
            zs = torch.randn(S, B, H, D, requires_grad=True)
            z = zs.transpose(0, 1)
        elif zlay == "slice":
            zs = torch.randn(B, S, H, 2 * D, requires_grad=True)
            z = zs[..., :D]
        else:
            zs = z = torch.randn(B, S, H, D, requires_grad=True)
        w = (1 + 0.1 * torch.randn(D)).requires_grad_()
        y = _GatedRMSNormTriton.apply(x, z, w, 1e-6)
        assert y.stride() == (z.stride() if zlay != "slice" else y.contiguous().stride()), (y.stride(), z.stride())
        gy = torch.randn(B, S, H, D)
        got = [y] + list(torch.autograd.grad(y, [x, zs, w], gy))
        yr = gated_rms_norm_ref(x.double(), z.double(), w.double(), 1e-6)
        want = [yr] + list(torch.autograd.grad(yr, [x, zs, w], gy.double()))
        for g, r in zip(got, want):
            worst = max(worst, ((g.double() - r.double()).norm() / r.double().norm()).item())
    print("WORST", worst)
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its CPU interpreter)")
@pytest.mark.parametrize("kernel", ["conv", "conv-prefetch", "conv-blocks", "norm"])
def test_triton_kernel_interpreted_matches_reference(kernel):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # the interpreter runs the first config only: the conv without and with its 4-row prefetch, and with the
    # prefetch over 3 blocks of 4 rows per program (the window and the partial sums carried between blocks)
    env["QWEN3_NEXT_CONV_CONFIGS"] = {"conv-prefetch": "128:1:16:4", "conv-blocks": "128:1:4:4:3"}.get(kernel, "128:1:32:0")
    code = NORM_CHILD if kernel == "norm" else CHILD
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    worst = float(out.stdout.split("WORST")[-1])
    assert worst < 1e-5, worst  # fp32 kernel math against the float64 reference


def test_triton_backend_refuses_what_it_does_not_cover():
    x = torch.randn(1, 8, 4)
    w = torch.randn(4, 4)
    with pytest.raises(ValueError, match="backend='triton' covers CUDA calls"):
        causal_conv1d(x, w, backend="triton")
    with pytest.raises(ValueError, match="width <= 4"):
        causal_conv1d(x, torch.randn(4, 5), backend="triton")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_conv_configs_setting_is_parsed_and_checked():
    from nemo_qwen3_next.ops.causal_conv1d_triton import _configs

    a, b, c = _configs("256:2:16:4,128:1:32,128:1:16:4:4")  # the prefetch depth (0) and blocks (1) are optional
    assert (a.kwargs, a.num_warps, b.kwargs, b.num_warps) == (dict(BD=256, L=16, PF=4, NB=1), 2,
                                                              dict(BD=128, L=32, PF=0, NB=1), 1)
    assert c.kwargs == dict(BD=128, L=16, PF=4, NB=4)
    for bad in ("128:1:16:3", "100:1:16", "128:1", "fast", "128:1:16:4:0", "128:1:16:4:2:1"):
        with pytest.raises(ValueError, match="QWEN3_NEXT_CONV_CONFIGS must be 'BD:warps:L\\[:PF\\[:NB\\]\\],...'"):
            _configs(bad)


def test_auto_on_cpu_stays_on_the_reference():
    from nemo_qwen3_next.ops.usage import kernels_used, reset

    reset()
    causal_conv1d(torch.randn(1, 8, 4), torch.randn(4, 4))
    assert kernels_used() == ["causal_conv1d:torch"]


def test_own_kernels_setting_is_checked(monkeypatch):
    from nemo_qwen3_next.ops import own_kernels

    monkeypatch.setattr(own_kernels, "ENABLED", "yes")
    with pytest.raises(ValueError, match="QWEN3_NEXT_OWN_KERNELS must be 0 or 1, got 'yes'"):
        own_kernels.enabled()
    monkeypatch.setattr(own_kernels, "ENABLED", "0")
    assert not own_kernels.enabled()
    monkeypatch.setattr(own_kernels, "FUSED_QK_NORM", "on")
    with pytest.raises(ValueError, match="QWEN3_NEXT_FUSED_QK_NORM must be 0 or 1, got 'on'"):
        own_kernels.fused_qk_norm()


def test_triton_norm_backend_refuses_cpu():
    from nemo_qwen3_next.ops.gated_rms_norm import gated_rms_norm

    x = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="backend='triton' for the gated RMSNorm covers CUDA"):
        gated_rms_norm(x, x, torch.ones(8), 1e-6, backend="triton")


LAYER_CHILD = textwrap.dedent(
    """
    import os
    import torch
    import nemo_qwen3_next.modules.gated_delta_net as gdn
    from nemo_qwen3_next.config import qwen3_next_tiny_5m
    from nemo_qwen3_next.model import init_distributed
    import importlib
    from nemo_qwen3_next.ops import own_kernels
    from nemo_qwen3_next.ops.usage import kernels_used, reset
    from nemo_qwen3_next.spec import get_qwen3_next_layer_spec
    from megatron.core.transformer.spec_utils import build_module

    init_distributed()
    cfg = qwen3_next_tiny_5m(hidden_size=32, linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=8,
                             linear_value_head_dim=16, linear_attention_chunk_size=8, params_dtype=torch.float32,
                             bf16=False)
    torch.manual_seed(0)
    m = build_module(get_qwen3_next_layer_spec(cfg, backend="local").submodules.linear_attention, config=cfg,
                     layer_number=1)
    with torch.no_grad():
        m.out_norm.weight.add_(0.1 * torch.randn_like(m.out_norm.weight))
    m.backend = "torch"  # the delta rule's reference; the conv and the norm are ours (interpreted) below
    m.out_norm.backend = "triton"
    conv = gdn.causal_conv1d  # the layer passes its own backend=: route every conv call to ours
    gdn.causal_conv1d = lambda *a, backend=None, **k: conv(*a, backend="triton", **k)
    conv_seam = importlib.import_module("nemo_qwen3_next.ops.causal_conv1d")  # the modules (ops exports functions)
    norm_seam = importlib.import_module("nemo_qwen3_next.ops.gated_rms_norm")
    conv_seam._ours_cover = lambda x, *a: True  # the interpreter runs on CPU tensors
    norm_seam._ours_cover = lambda x, z: True
    own_kernels.enabled = lambda: True  # the sequence-first planar path

    def run(path, x):
        m.zero_grad(set_to_none=True)
        x = x.detach().requires_grad_(True)
        y, _ = path(x, None)
        (y * probe).sum().backward()
        return [y.detach(), x.grad] + [p.grad.clone() for p in m.parameters()]

    x = torch.randn(24, 2, 32)  # [s, b, H], b = 2: the sequence-first path
    probe = torch.randn(24, 2, 32)
    reset()
    got = run(m._forward_fused, x)
    assert {"causal_conv1d:triton", "gated_rms_norm:triton"} <= set(kernels_used()), kernels_used()
    if os.environ["QWEN3_NEXT_ONE_IN_PROJ_GEMM"] == "1":  # q, k, v, z written in place by our kernels, b and a copied
        assert "column_views_grad:4/6 in place" in kernels_used(), kernels_used()
    assert own_kernels.fused_qk_norm() == (own_kernels.FUSED_QK_NORM == "1")
    want = run(m._forward_reference, x)
    print("WORST", max(((g - w).norm() / w.norm()).item() for g, w in zip(got, want)))
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its CPU interpreter)")
@pytest.mark.parametrize("fused_qk_norm,one_gemm", [("0", "1"), ("1", "1"), ("1", "0")])
def test_gdn_sequence_first_path_with_our_kernels_equals_reference(fused_qk_norm, one_gemm):
    """The GDN layer's fused path as it runs on the GPU with QWEN3_NEXT_OWN_KERNELS=1 (sequence-first planar
    GEMMs, our conv reading their strided views, our norm writing the output sequence-first; with
    QWEN3_NEXT_FUSED_QK_NORM=1 the q/k L2-norm inside the conv), our kernels interpreted on CPU, against
    `_forward_reference`: output, input gradient and every parameter gradient."""
    env = dict(os.environ, TRITON_INTERPRET="1", QWEN3_NEXT_FUSED_QK_NORM=fused_qk_norm, QWEN3_NEXT_ONE_IN_PROJ_GEMM=one_gemm,
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", LAYER_CHILD], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    worst = float(out.stdout.split("WORST")[-1])
    assert worst < 1e-5, worst


def test_conv_l2norm_head_dim_on_the_reference_path():
    """`causal_conv1d(..., l2norm_head_dim=)` on CPU: the conv, then each head L2-normalised in fp32 (HF's
    `l2norm` on the conv output, computed here independently); a head size that does not divide D is named."""
    from nemo_qwen3_next.ops import causal_conv1d_ref

    torch.manual_seed(0)
    x, w = torch.randn(2, 9, 12, dtype=torch.float64), torch.randn(12, 4, dtype=torch.float64)
    y, _ = causal_conv1d(x, w, activation="silu", l2norm_head_dim=4)
    plain, _ = causal_conv1d_ref(x, w, activation="silu")
    heads = plain.view(2, 9, 3, 4)
    want = (heads / torch.sqrt((heads * heads).sum(-1, keepdim=True) + 1e-6)).view(2, 9, 12)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="l2norm_head_dim must be a positive divisor of the channel count D=12; got 5"):
        causal_conv1d(x, w, l2norm_head_dim=5)
