"""The switch for our own Triton kernels: the causal conv (`causal_conv1d_triton`), the gated RMSNorm
(`gated_rms_norm_triton`) and the GDN's sequence-first planar path, which needs both (no batch-first
transposes of the layer's input and output at B > 1).

On by default wherever triton imports: on the GPU they are faster than fla's conv and norm and no less
accurate (tests, timing: docs/gpu.md). Off (fla's kernels): ``QWEN3_NEXT_OWN_KERNELS=0``, or
``nemo_qwen3_next.ops.own_kernels.ENABLED = "0"`` in a process. CPU runs take the torch references
either way.
"""

from __future__ import annotations

import functools
import os

ENABLED = os.environ.get("QWEN3_NEXT_OWN_KERNELS", "1")
#: the GDN's q/k L2-norm inside our conv (`causal_conv1d(..., l2norm_head_dim=)`) instead of the chunk kernel's
#: separate passes; ``QWEN3_NEXT_FUSED_QK_NORM=0`` goes back to those. On by default since its bf16 GPU tests
#: passed (H100, Dec 06: conv cases and the GDN layer against fp32, errors at or below the unfused path's) and
#: it was faster in the same call (graphed GDN fwd+bwd 7.75 vs 7.91 ms at B=4 T=4096, 14.99 vs 15.59 at T=32K).
FUSED_QK_NORM = os.environ.get("QWEN3_NEXT_FUSED_QK_NORM", "1")
#: the GDN's planar in_proj as one GEMM whose output q, k, v, z, b, a are column views, our conv and norm writing
#: their input gradients into one buffer (`grad_sink`), instead of five GEMMs on the weight pieces (whose input
#: gradient is four ``addmm_`` accumulations); ``QWEN3_NEXT_ONE_IN_PROJ_GEMM=0`` goes back to those.
ONE_IN_PROJ_GEMM = os.environ.get("QWEN3_NEXT_ONE_IN_PROJ_GEMM", "1")


def switch_on(name: str, value: str) -> bool:
    """A switch's value ("0" or "1", named in the error otherwise) as a bool."""
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def enabled() -> bool:
    """Whether "auto" dispatch takes our kernels where they apply (and triton imports)."""
    return switch_on("QWEN3_NEXT_OWN_KERNELS", ENABLED) and triton_ok()


def fused_qk_norm() -> bool:
    """Whether the GDN's planar path L2-normalises q and k in our conv (needs our kernels on)."""
    return switch_on("QWEN3_NEXT_FUSED_QK_NORM", FUSED_QK_NORM) and enabled()


def one_in_proj_gemm() -> bool:
    """Whether the GDN's planar path runs in_proj as one GEMM with column views (needs our kernels on)."""
    return switch_on("QWEN3_NEXT_ONE_IN_PROJ_GEMM", ONE_IN_PROJ_GEMM) and enabled()


@functools.lru_cache(maxsize=None)
def triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True
