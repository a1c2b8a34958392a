"""RMSNorm over the last dim: ``y = x̂ · w`` with ``x̂ = x / rms(x)``, fp32 inside, cast to ``x``'s dtype.

``rms_norm`` is the dispatch seam: fla's fused Triton kernel (``fla.modules.norm.layernorm.rms_norm``:
one pass forward, one pass backward) for CUDA tensors, ``rms_norm_ref`` (plain torch) elsewhere.
The unfused torch version costs ~6 kernels forward and ~10 backward per norm; a Qwen3-Next layer has
two norms on the residual stream plus the QK norms, so this is launch- and bandwidth-bound glue.
The caller passes the effective gain (``1 + w`` for Qwen3-Next's zero-centred weights) in fp32, as
HF computes it.
"""

from __future__ import annotations

import functools

import torch

from .usage import record

__all__ = ["rms_norm", "rms_norm_ref"]


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF `Qwen3NextRMSNorm` math: fp32 normalisation and gain, one cast at the end."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


@functools.lru_cache(maxsize=None)
def _load_fla_rms_norm():
    try:
        from fla.modules.norm.layernorm import rms_norm as fn
    except Exception:
        return None
    return fn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """``x``: ``[..., D]``; ``weight``: ``[D]`` (fp32 recommended). backend: ``auto`` | ``torch`` | ``fla``."""
    fn = None if backend == "torch" or (backend == "auto" and not x.is_cuda) else _load_fla_rms_norm()
    if fn is None:
        if backend == "fla":
            raise ImportError("backend='fla' for RMSNorm needs fla: `pip install fla-core`")
        record("rms_norm", "torch")
        return rms_norm_ref(x, weight, eps)
    record("rms_norm", "fla")
    return fn(x, weight, None, eps=eps)
