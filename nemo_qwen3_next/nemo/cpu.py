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


# ---------------------------------------------------------------------- trainer (pretraining)
# Added for `examples/pretrain.py` (nemo_qwen3_next.training): what NeMo's trainer and Megatron's
# optimizer/schedules need on CPU beyond loading and running. `apply_trainer()` applies these plus
# `WORKAROUNDS`, again only without CUDA.

import contextlib as _contextlib
import functools as _functools
import os as _os

_TRAINER_APPLIED = False
_FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "randn", "rand", "randint",
              "empty_like", "zeros_like", "ones_like", "full_like")


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, int):
        return True  # a bare ordinal means a CUDA device in torch
    return str(device).startswith("cuda")


def treat_cuda_as_cpu() -> None:
    """Map every explicit 'cuda' device request to the CPU.

    megatron-core's optimizer (`found_inf`, loss scale), clip_grads, schedules (`total_num_tokens`),
    timers and data-parallel checkpoint-load exchange (`empty_like(..., device="cuda")`), and
    NeMo's strategy, sampler and loss reduction create small bookkeeping tensors
    with ``device='cuda'``, ``.cuda()`` or ``pin_memory=True`` + ``.to('cuda')``. On a machine with
    no CUDA all of those would fail; here they land on the CPU, where the model already is.
    """

    def wrap_factory(fn):
        @_functools.wraps(fn)
        def factory(*args, **kwargs):
            if _is_cuda(kwargs.get("device")):
                kwargs["device"] = "cpu"
            kwargs.pop("pin_memory", None)
            return fn(*args, **kwargs)

        return factory

    for name in _FACTORIES:
        setattr(torch, name, wrap_factory(getattr(torch, name)))

    orig_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and _is_cuda(args[0]) and not isinstance(args[0], torch.dtype):
            args = ("cpu",) + args[1:]
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return orig_to(self, *args, **kwargs)

    torch.Tensor.to = to
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.pin_memory = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self


def stub_cuda_streams_and_memory_stats() -> None:
    """`torch.cuda.Stream()` in NeMo's MegatronParallel, `synchronize`, memory statistics."""

    class _Stream:
        def __init__(self, *a, **k):
            pass

        def wait_stream(self, *a, **k):
            pass

        def synchronize(self):
            pass

    torch.cuda.Stream = _Stream
    torch.cuda.stream = lambda *a, **k: _contextlib.nullcontext()
    torch.cuda.current_stream = lambda *a, **k: _Stream()
    torch.cuda.synchronize = lambda *a, **k: None
    for name in ("max_memory_allocated", "max_memory_reserved", "memory_allocated", "memory_reserved"):
        setattr(torch.cuda, name, lambda *a, **k: 0)
    torch.cuda.empty_cache = lambda: None


def cpu_clip_grad_by_total_norm() -> None:
    """megatron's `clip_grad_by_total_norm_fp32` asserts ``grad.type() == 'torch.cuda.FloatTensor'``
    (so ``clip_grad > 0`` fails on CPU). Same math, with the assert on dtype instead of device."""
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.utils import to_local_if_dtensor

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = []
        for param in parameters:
            grad = getattr(param, attr, None)
            if grad is not None:
                assert grad.dtype in (torch.float32, torch.bfloat16), grad.dtype
                grads.append(to_local_if_dtensor(grad).detach())
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            torch._foreach_mul_(grads, clip_coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


def cpu_checkpoint_load() -> None:
    """NeMo's checkpoint loader asserts ``torch.cuda.is_initialized()`` to move loaded tensors to
    the current GPU (`nemo.lightning.io.pl._fix_tensors_device`), so resuming fails on CPU. On CPU
    the loaded tensors are already where the model is: keep them."""
    from nemo.lightning.io import pl as nemo_io_pl

    nemo_io_pl._fix_tensors_device = lambda ckpt: ckpt


def seed_megatron_rng_on_cpu() -> None:
    """NeMo seeds Megatron's tensor-parallel RNG tracker only when GPUs exist; without it the
    model's ``get_cuda_rng_tracker().fork()`` fails. Seed it (CPU generators) right after NeMo
    initialises model parallelism, from Lightning's global seed."""
    from nemo.lightning import _strategy_lib
    from nemo.lightning.pytorch.strategies import megatron_strategy

    from ..compat import seed_cpu

    orig = _strategy_lib.init_model_parallel

    @_functools.wraps(orig)
    def init_model_parallel(*args, **kwargs):
        out = orig(*args, **kwargs)
        seed_cpu(int(_os.environ.get("PL_GLOBAL_SEED", 1234)))
        return out

    _strategy_lib.init_model_parallel = init_model_parallel
    megatron_strategy.init_model_parallel = init_model_parallel


TRAINER_WORKAROUNDS = [
    treat_cuda_as_cpu,
    stub_cuda_streams_and_memory_stats,
    cpu_clip_grad_by_total_norm,
    cpu_checkpoint_load,
    seed_megatron_rng_on_cpu,
]


def apply_trainer() -> bool:
    """`apply()` plus the trainer workarounds, once, only when CUDA is unavailable. Idempotent."""
    global _TRAINER_APPLIED
    if torch.cuda.is_available():
        return False
    apply()
    if not _TRAINER_APPLIED:
        for fn in TRAINER_WORKAROUNDS:
            fn()
        _TRAINER_APPLIED = True
    return True
