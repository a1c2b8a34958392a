"""Fixes for NeMo 2.7.3 / megatron-core 0.15.3 that pretraining needs on every machine (GPU too).

The CPU-only workarounds live in `nemo_qwen3_next.nemo.cpu` (`apply_trainer()`); `apply` here
applies both: the fixes below always, the CPU ones only when CUDA is unavailable.
"""

from __future__ import annotations

import functools

import torch


def fix_rank0_timer_allgather() -> None:
    """megatron-core 0.15.3 `Timers._get_elapsed_time_all_ranks` all-gathers even when no timer is
    registered, and NeMo's progress printer asks for the timer string on rank 0 only: with TP=2
    the other rank never joins and the run hangs (seen at the first checkpoint save). 0.16 returns
    early for an empty name list; do the same. Applied on GPU too: the bug is not CPU-specific."""
    from megatron.core import timers

    orig = timers.Timers.get_all_timers_string
    if getattr(orig, "_qwen3_next_fixed", False):
        return

    @functools.wraps(orig)
    def get_all_timers_string(self, names=None, *args, **kwargs):
        if names is None:
            names = list(self._timers.keys())
        if len(names) == 0:
            return None
        return orig(self, names, *args, **kwargs)

    get_all_timers_string._qwen3_next_fixed = True
    timers.Timers.get_all_timers_string = get_all_timers_string


def stub_missing_resiliency_ext() -> None:
    """NeMo's `NeMoLogger` isinstance-checks every checkpoint callback against
    `nvidia_resiliency_ext`'s `LocalCheckpointCallback`; when that optional package is absent the
    check itself raises `UnavailableError`. Give it a class nothing is an instance of. Not CPU
    specific: applied wherever the package is missing."""
    from nemo.lightning import nemo_logger

    if getattr(nemo_logger, "HAVE_RES", True):
        return

    class _NoLocalCheckpointCallback:
        pass

    class _Namespace:
        LocalCheckpointCallback = _NoLocalCheckpointCallback

    nemo_logger.lcp = _Namespace()


def fix_numpy2_product() -> None:
    """megatron-core 0.15.3 declares numpy<2 but is often installed next to numpy 2, where
    `np.product` is gone; its fully-parallel checkpoint save (`exchange_utils._shard_size`) calls it
    (AttributeError at the first multi-GPU save, seen on H200 with numpy 2.5). Alias it to `np.prod`."""
    import numpy as np

    if not hasattr(np, "product"):
        np.product = np.prod


def apply(force_cpu: bool = False) -> bool:
    """Apply the fixes, and the CPU workarounds when CUDA is unavailable. Idempotent.
    Returns True when the CPU workarounds are active."""
    fix_rank0_timer_allgather()
    stub_missing_resiliency_ext()
    fix_numpy2_product()
    if torch.cuda.is_available():
        if force_cpu:
            raise RuntimeError("trainer.accelerator=cpu on a machine with CUDA is not supported; "
                               "hide the GPUs with CUDA_VISIBLE_DEVICES= instead.")
        return False
    from ..nemo import cpu

    return cpu.apply_trainer()
