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


def dist_checkpoint_save_sync_copy() -> None:
    """Megatron's torch_dist save stages tensors with ``non_blocking=True`` and then calls
    `torch.cuda.synchronize()` (AssertionError without CUDA): stage with a blocking copy instead."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    preload = FileSystemWriterAsync.preload_tensors
    if getattr(preload, "_cpu_patched", False):
        return

    def preload_tensors(write_buckets, non_blocking=True):
        return preload(write_buckets, non_blocking=False)

    preload_tensors._cpu_patched = True
    FileSystemWriterAsync.preload_tensors = staticmethod(preload_tensors)


WORKAROUNDS = [megatron_core_cpu, dist_checkpoint_save_sync_copy]


def apply() -> bool:
    """Apply every CPU workaround once, if (and only if) CUDA is unavailable. Idempotent."""
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return _APPLIED
    for fn in WORKAROUNDS:
        fn()
    _APPLIED = True
    return True
