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


def enabled() -> bool:
    """Whether "auto" dispatch takes our kernels where they apply (and triton imports)."""
    if ENABLED not in ("0", "1"):
        raise ValueError(f"QWEN3_NEXT_OWN_KERNELS must be 0 or 1, got {ENABLED!r}")
    return ENABLED == "1" and triton_ok()


@functools.lru_cache(maxsize=None)
def triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True
