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


def fix_cp_aux_loss_scale() -> None:
    """Under context parallelism each CP rank's MoE aux loss (load balancing, also the z-loss: same
    scaler) is its share of the sequence's, and DDP averages gradients over data x context parallel;
    megatron-core 0.15.3 sets the aux-loss gradient scale to 1 / micro-batches without the CP size, so
    the aux loss weighs 1/CP of its CP=1 weight. Megatron-LM #2217/#2237 (later megatron-core)
    multiplies that scale by the CP size, as the main loss is; do the same on 0.15.3. Per-token-loss
    runs (``calculate_per_token_loss``) keep Megatron's scale: their normalisation differs."""
    import inspect

    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    orig = schedules.forward_step_calc_loss
    if getattr(orig, "_qwen3_next_fixed", False):
        return
    if "loss_scale * cp_group_size" in inspect.getsource(orig):  # a megatron-core that has the fix
        return
    signature = inspect.signature(orig)

    @functools.wraps(orig)
    def forward_step_calc_loss(*args, **kwargs):
        out = orig(*args, **kwargs)
        bound = signature.bind(*args, **kwargs).arguments
        config = bound["config"]
        if getattr(config, "num_moe_experts", None) and not config.calculate_per_token_loss:
            cp = bound.get("cp_group_size") or parallel_state.get_context_parallel_world_size()
            if cp > 1:
                MoEAuxLossAutoScaler.set_loss_scale(MoEAuxLossAutoScaler.main_loss_backward_scale * cp)
        return out

    forward_step_calc_loss._qwen3_next_fixed = True
    schedules.forward_step_calc_loss = forward_step_calc_loss


def fuse_torch_adam(optimizer, devices=("cuda",)) -> int:
    """Switch a Megatron optimizer's torch Adam/AdamW to torch's fused kernel; returns the groups switched.

    Without TransformerEngine or Apex, megatron-core builds ``torch.optim.AdamW`` with its defaults, i.e. the
    foreach implementation: several multi-tensor kernels per step, each reading and writing the fp32 masters
    and moments. On the reduced model (1.57B parameters) Megatron's DDP + Adam step added 56 ms to a 76 ms
    forward/backward on an H200 (docs/performance.md). ``fused=True`` is the same update in one kernel per
    tensor group; torch reads ``group["fused"]`` at every step, so setting it after construction is enough,
    and ``load_state_dict`` moves a checkpoint's ``step`` to the device as fused wants. Only groups whose
    parameters are all floating tensors on ``devices`` are switched (CPU runs keep Megatron's choice)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if type(inner) not in (torch.optim.Adam, torch.optim.AdamW):
        return 0
    n = 0
    for group in inner.param_groups:
        params = group["params"]
        if params and not group.get("fused") and not group.get("differentiable") and all(
                p.device.type in devices and p.is_floating_point() for p in params):
            group["fused"], group["foreach"] = True, False
            n += 1
    if n:
        for group in inner.param_groups:
            for p in group["params"]:
                _FUSED_OWNER[id(p)] = inner
    return n


# id(fp32 main parameter) -> the fused torch Adam that updates it (`fold_clip_into_fused_adam`)
_FUSED_OWNER: "dict" = {}


def _fused_owner(parameters):
    """The one fused torch Adam/AdamW (every group fused) updating all of `parameters`, else None."""
    params = [p for p in parameters if p.grad is not None]
    owner = _FUSED_OWNER.get(id(params[0])) if params else None
    if owner is None or not all(g.get("fused") for g in owner.param_groups):
        return None
    owned = {id(p) for g in owner.param_groups for p in g["params"]}
    return owner if all(id(p) in owned for p in params) else None


def fold_clip_into_fused_adam() -> bool:
    """Gradient clipping without its pass over the gradients: where the clipped parameters are all updated
    by one fused torch Adam/AdamW (`fuse_torch_adam`), ``clip_grad_by_total_norm_fp32`` hands the clip
    factor to the optimizer as its ``grad_scale`` (torch's fused kernel divides each gradient by it as it
    reads it; the same attribute `torch.amp.GradScaler` uses) instead of multiplying every fp32 gradient
    in place (6.3 GB read and written per step on the reduced model). Set every step (None when the norm
    is under the limit), so nothing carries over; other optimizers keep Megatron's path. Returns True
    once installed."""
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mopt

    orig = getattr(mopt, "clip_grad_by_total_norm_fp32", None)
    if orig is None or getattr(orig, "_qwen3_next_fixed", False):
        return orig is not None

    @functools.wraps(orig)
    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        owner = None if use_decoupled_grad else _fused_owner(parameters)
        if owner is None:
            return orig(parameters, max_norm, total_norm, use_decoupled_grad)
        clip_coeff = max_norm / (total_norm + 1.0e-6)  # megatron-core's formula
        device = owner.param_groups[0]["params"][0].device
        owner.grad_scale = (torch.tensor(1.0 / clip_coeff, dtype=torch.float32, device=device)
                            if clip_coeff < 1.0 else None)

    clip_grad_by_total_norm_fp32._qwen3_next_fixed = True
    mopt.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    return True


def use_fused_torch_adam() -> None:
    """Every optimizer megatron-core builds (NeMo's too: it calls `get_megatron_optimizer`, which builds each
    through `_get_megatron_optimizer_based_on_param_groups`) gets `fuse_torch_adam`."""
    from megatron.core import optimizer as mopt

    orig = mopt._get_megatron_optimizer_based_on_param_groups
    if getattr(orig, "_qwen3_next_fixed", False):
        return

    @functools.wraps(orig)
    def build(*args, **kwargs):
        opt = orig(*args, **kwargs)
        if opt is not None:
            fuse_torch_adam(opt)
        return opt

    build._qwen3_next_fixed = True
    mopt._get_megatron_optimizer_based_on_param_groups = build


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for megatron-core's `local_multi_tensor_l2_norm` (its no-TE/Apex fallback): the same
    fp32 L2 norm of all tensors, from `torch._foreach_norm`, returned as a 1-element tensor on their device.
    The fallback builds a CPU tensor from one 0-d CUDA norm per parameter: a host sync per parameter
    (57 per step on the reduced model) in every clipped optimizer step."""
    tensors = [t for tl in tensor_lists for t in tl]
    if not tensors:
        return torch.zeros(1, dtype=torch.float, device="cuda" if torch.cuda.is_available() else "cpu"), None
    norms = torch._foreach_norm(tensors)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    return total.reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for megatron-core's `local_multi_tensor_scale` (``dst = src * scale``): in place with
    `torch._foreach_mul_` where dst is src (gradient clipping), else `_foreach_mul` + `_foreach_copy_`
    (the main -> model parameter copy, fp32 -> bf16). The fallback loops ``dst.copy_(src * scale)`` over
    the parameters: a temporary and two passes over every gradient."""
    src, dst = list(tensor_lists[0]), list(tensor_lists[1])
    if not src:
        return
    if all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    elif scale == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def use_foreach_multi_tensor_ops() -> int:
    """Where megatron-core fell back to its local multi-tensor helpers (no TransformerEngine, no Apex),
    use `foreach_l2_norm` / `foreach_scale` instead, in the modules that picked them at import
    (gradient clipping, the mixed-precision optimizer's parameter copy). Returns how many were replaced."""
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads, optimizer as mopt

    n = 0
    for mod, name, local, ours in ((clip_grads, "l2_norm_impl", mutils.local_multi_tensor_l2_norm, foreach_l2_norm),
                                   (clip_grads, "multi_tensor_scale_impl", mutils.local_multi_tensor_scale, foreach_scale),
                                   (mopt, "multi_tensor_scale_impl", mutils.local_multi_tensor_scale, foreach_scale)):
        if getattr(mod, name, None) is local:
            setattr(mod, name, ours)
            n += 1
    return n


class _PendingGradCheck:
    """The last finish_grad_sync's NaN/Inf verdict, still on its way to the host (see `defer_grad_nan_check`)."""

    norms = None  # per bucket-group tensors of bucket norms (for the message)
    flag = None  # bool tensor: some norm is not finite (pinned host memory under CUDA)
    event = None  # CUDA event after the flag's copy; None when the flag is already on the host


def raise_pending_grad_nan() -> None:
    """Raise megatron's NaN/Inf message if the last finish_grad_sync saw a bad gradient norm; waits only for
    that step's backward (a no-op when nothing is pending). Runs before every torch optimizer step."""
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    norms, flag, event = _PendingGradCheck.norms, _PendingGradCheck.flag, _PendingGradCheck.event
    if norms is None:
        return
    _PendingGradCheck.norms = _PendingGradCheck.flag = _PendingGradCheck.event = None
    if event is not None:
        event.synchronize()
    if not bool(flag):
        return
    for n in norms:
        bad = (~torch.isfinite(n)).nonzero().flatten().tolist()
        if bad:
            i = bad[0]
            kind = "NaN" if torch.isnan(n[i]) else "Inf"
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            raise RuntimeError(
                f"Rank {rank}, iteration {get_rerun_state_machine().current_iteration}: found {kind} in local "
                f"grad norm for bucket #{i} in backward pass before data-parallel communication collective "
                f"(checked at finish_grad_sync, raised before the optimizer step)")


def _record_grad_check(norms) -> None:
    """Start the norms' verdict on its way to the host without waiting for it (no sync under CUDA)."""
    raise_pending_grad_nan()  # an unread verdict of an earlier step (no optimizer step ran since)
    bad = ~torch.isfinite(torch.cat(norms)).all()
    if bad.is_cuda:
        flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        flag.copy_(bad, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    else:
        flag, event = bad, None
    _PendingGradCheck.norms, _PendingGradCheck.flag, _PendingGradCheck.event = norms, flag, event


def defer_grad_nan_check() -> bool:
    """megatron-core DDP's ``check_for_nan_in_grad``: the same check, no host sync inside the step. Returns
    True when installed (idempotent).

    megatron-core 0.15 checks each bucket's local gradient norm for NaN/Inf as the bucket's reduction starts,
    inside the backward pass, and each check reads the norm on the host (20 syncs per step on the reduced
    model, each stalling the CPU until the GPU has caught up, so the next kernels launch late). Here the
    bucket norms are still computed there, before the data-parallel collective, but only kept on the GPU;
    `DistributedDataParallel.finish_grad_sync` combines them into one flag and starts its copy to pinned host
    memory; the flag is read (megatron's own message: rank, bucket, NaN or Inf) just before the next torch
    optimizer step (a global step pre-hook), so no update is ever applied from bad gradients, while the CPU
    runs ahead through the loop's post-backward Python (NeMo: finalize_model_grads, loss reduction, logging)
    instead of waiting there for the backward to finish. Without an optimizer step in between, the next
    finish_grad_sync reads it. Megatron's path is kept whenever its rerun state machine is enabled or the
    large-gradient check is asked for."""
    from megatron.core.distributed import distributed_data_parallel as mddp
    from megatron.core.distributed import param_and_grad_buffer as pgb
    from megatron.core.rerun_state_machine import RerunMode, get_rerun_state_machine

    group_cls, ddp_cls = getattr(pgb, "_ParamAndGradBucketGroup", None), mddp.DistributedDataParallel
    orig_check = getattr(group_cls, "check_grads", None)
    if orig_check is None or getattr(orig_check, "_qwen3_next_fixed", False):
        return orig_check is not None
    orig_finish = ddp_cls.finish_grad_sync

    @functools.wraps(orig_check)
    def check_grads(self, check_for_nan_or_inf, check_for_large):
        if check_for_large or not check_for_nan_or_inf or get_rerun_state_machine().mode != RerunMode.DISABLED:
            return orig_check(self, check_for_nan_or_inf, check_for_large)
        stale = getattr(self, "_qwen3_next_grad_norms", None)
        if stale is not None:  # a finish_grad_sync that is not DDP's never read them: check now, late
            self._qwen3_next_grad_norms = None
            _record_grad_check([stale])
            raise_pending_grad_nan()
        self._qwen3_next_grad_norms = torch.stack([b.grad_data.norm(p=2) for b in self.buckets])

    @functools.wraps(orig_finish)
    def finish_grad_sync(self, *args, **kwargs):
        out = orig_finish(self, *args, **kwargs)
        groups = [g for g in self.bucket_groups + self.expert_parallel_bucket_groups
                  if getattr(g, "_qwen3_next_grad_norms", None) is not None]
        if groups:
            norms = [g._qwen3_next_grad_norms for g in groups]
            for g in groups:
                g._qwen3_next_grad_norms = None
            _record_grad_check(norms)
        return out

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    register_optimizer_step_pre_hook(lambda *_: raise_pending_grad_nan())
    check_grads._qwen3_next_fixed = True
    group_cls.check_grads = check_grads
    ddp_cls.finish_grad_sync = finish_grad_sync
    return True


def apply(force_cpu: bool = False) -> bool:
    """Apply the fixes, and the CPU workarounds when CUDA is unavailable. Idempotent.
    Returns True when the CPU workarounds are active."""
    fix_rank0_timer_allgather()
    stub_missing_resiliency_ext()
    fix_numpy2_product()
    fix_cp_aux_loss_scale()
    use_fused_torch_adam()
    use_foreach_multi_tensor_ops()
    defer_grad_nan_check()
    fold_clip_into_fused_adam()
    if torch.cuda.is_available():
        if force_cpu:
            raise RuntimeError("trainer.accelerator=cpu on a machine with CUDA is not supported; "
                               "hide the GPUs with CUDA_VISIBLE_DEVICES= instead.")
        return False
    from ..nemo import cpu

    return cpu.apply_trainer()
