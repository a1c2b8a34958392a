"""NeMo / Megatron workarounds for machines without CUDA, in one place.

Each workaround is a small named function; `apply()` runs them all once, and only when CUDA is
unavailable (on GPU it does nothing). Measured on NeMo 2.7.3 + megatron-core 0.15.3
(see shared/CPU_NOTES.md). Add new workarounds as functions and list them in `WORKAROUNDS`.
"""

from __future__ import annotations

import torch

_APPLIED = False


def megatron_core_cpu() -> None:
    """The core's megatron-core patches: `torch.cuda.current_device()` -> 'cpu', TE-less router."""
    from ..compat import apply_cpu_compat

    apply_cpu_compat()


WORKAROUNDS = [megatron_core_cpu]


def apply() -> bool:
    """Apply every CPU workaround once, if (and only if) CUDA is unavailable. Idempotent."""
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return _APPLIED
    for fn in WORKAROUNDS:
        fn()
    _APPLIED = True
    return True
