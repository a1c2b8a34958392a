"""Everything the NeMo 2 trainer and megatron-core 0.15.3 need to train on a machine without CUDA.

`apply()` is the only entry point; it is a no-op when CUDA is available, except for
`fix_rank0_timer_allgather` (a megatron-core 0.15.3 hang that GPUs hit too) and
`stub_missing_resiliency_ext` (an optional NeMo dependency), which are applied everywhere. Each workaround is one named function that states what it fixes
(measured on torch 2.13 CPU, NeMo 2.7.3, megatron-core 0.15.3; see shared/CPU_NOTES.md).

Model-level CPU patches (current device, `te_general_gemm`) live in `nemo_qwen3_next.compat`
and are applied from here too.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

_APPLIED = False
_FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "randn", "rand", "randint")


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

    megatron-core's optimizer (`found_inf`, loss scale), clip_grads, schedules (`total_num_tokens`)
    and timers, and NeMo's strategy, sampler and loss reduction create small bookkeeping tensors
    with ``device='cuda'``, ``.cuda()`` or ``pin_memory=True`` + ``.to('cuda')``. On a machine with
    no CUDA all of those would fail; here they land on the CPU, where the model already is.
    """

    def wrap_factory(fn):
        @functools.wraps(fn)
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
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
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

    @functools.wraps(orig)
    def init_model_parallel(*args, **kwargs):
        out = orig(*args, **kwargs)
        seed_cpu(int(os.environ.get("PL_GLOBAL_SEED", 1234)))
        return out

    _strategy_lib.init_model_parallel = init_model_parallel
    megatron_strategy.init_model_parallel = init_model_parallel


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


def apply(force_cpu: bool = False) -> bool:
    """Apply the trainer workarounds; the CPU ones only when CUDA is unavailable. Idempotent.
    Returns True when the CPU workarounds are active."""
    global _APPLIED
    fix_rank0_timer_allgather()
    stub_missing_resiliency_ext()
    if torch.cuda.is_available():
        if force_cpu:
            raise RuntimeError("trainer.accelerator=cpu on a machine with CUDA is not supported; "
                               "hide the GPUs with CUDA_VISIBLE_DEVICES= instead.")
        return False
    if _APPLIED:
        return True
    from ..compat import apply_cpu_compat

    apply_cpu_compat()
    treat_cuda_as_cpu()
    stub_cuda_streams_and_memory_stats()
    cpu_clip_grad_by_total_norm()
    cpu_checkpoint_load()
    seed_megatron_rng_on_cpu()
    _APPLIED = True
    return True
