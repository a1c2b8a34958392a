"""Gated RMSNorm of the GDN output: ``y = (w · x̂) · silu(z)`` over the last dim (HF ``Qwen3NextRMSNormGated``).

``gated_rms_norm`` is the dispatch seam: fla's fused Triton kernel (``fla.modules.fused_norm_gate.
rms_norm_gated``: one pass forward, one pass backward, fp32 inside) for CUDA tensors, the plain-torch
``gated_rms_norm_ref`` elsewhere; with ``QWEN3_NEXT_OWN_KERNELS=1`` (or ``backend="triton"``), our
`gated_rms_norm_triton` for 4-D inputs, which reads x and z and writes the result each in its own
layout (the GDN's sequence-first path).  The two differ only by rounding: the reference rounds ``x̂`` to the
input dtype before the gain (HF's casts, kept bit for bit), the kernel keeps fp32 until the end.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import own_kernels
from .usage import record

__all__ = ["gated_rms_norm", "gated_rms_norm_ref"]

_BACKENDS = ("auto", "torch", "triton", "fla")


def gated_rms_norm_ref(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF `Qwen3NextRMSNormGated` math, bit for bit (its casts included)."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * xf.to(dtype)
    y = y * F.silu(gate.float())
    return y.to(dtype)


@functools.lru_cache(maxsize=None)
def _load_fla_norm():
    try:
        from fla.modules.fused_norm_gate import rms_norm_gated
    except Exception:
        return None
    return rms_norm_gated


def _ours_cover(x: torch.Tensor, gate: torch.Tensor) -> bool:
    """Whether our Triton norm takes the call: CUDA, 4-D ``[B, S, H, D]`` of one shape, unit stride in D."""
    return (
        x.is_cuda and x.dim() == 4 and gate.shape == x.shape and x.stride(-1) == 1 and gate.stride(-1) == 1
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
    )


def gated_rms_norm(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto", gate_grad_sink=None
) -> torch.Tensor:
    """``x``, ``gate``: ``[..., D]`` (any strides), ``weight``: ``[D]``. Returns ``[..., D]`` in ``x.dtype``.

    gate_grad_sink: where gate is a view of a GEMM output split by `grad_sink.column_views`, its sink: our
    kernel writes the gate's gradient into its place there (the other backends' is copied there).

    backend: ``"auto"`` (fla's kernel for CUDA tensors when importable; ours first with
    ``QWEN3_NEXT_OWN_KERNELS=1``), ``"torch"``, ``"triton"``, ``"fla"``.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "triton" or (backend == "auto" and x.is_cuda and own_kernels.enabled()):
        if _ours_cover(x, gate) and own_kernels.triton_ok():
            from .gated_rms_norm_triton import gated_rms_norm_triton  # imports triton

            record("gated_rms_norm", "triton")
            return gated_rms_norm_triton(x, gate, weight, eps, gate_grad_sink)
        if backend == "triton":
            raise ValueError(
                "backend='triton' for the gated RMSNorm covers CUDA [B, S, H, D] x and gate of one shape with unit "
                f"stride in D (needs triton); got x {tuple(x.shape)} on {x.device}, gate {tuple(gate.shape)}"
            )
    use_ref = backend == "torch" or (backend == "auto" and not x.is_cuda)
    fn = None if use_ref else _load_fla_norm()
    if fn is None:
        if backend == "fla":
            raise ImportError("backend='fla' for the gated RMSNorm needs fla: `pip install fla-core`")
        record("gated_rms_norm", "torch")
        return gated_rms_norm_ref(x, gate, weight, eps)
    record("gated_rms_norm", "fla")
    return fn(x, gate, weight, None, activation="swish", eps=eps)
