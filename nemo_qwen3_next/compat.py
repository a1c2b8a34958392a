"""The one place where we adapt megatron-core 0.15 to machines without CUDA.

megatron-core assumes a GPU in a few spots that do not matter for the math (measured on
0.15.3, see shared/CPU_NOTES.md):

* `torch.cuda.current_device()` used as a *device argument* (rotary embeddings, the global
  memory buffer used by sequence-parallel gathers, router buffers, the MoE router moving its
  weight "to the GPU"). Without CUDA we answer ``"cpu"``, which every such call site accepts.
* `moe_utils.te_general_gemm` is an unbound name when TransformerEngine is absent (NameError
  in the router); it must be ``None`` so the plain `torch.mm` path runs. This one is a bug of
  every TE-less install, GPU too (seen on H200): `fix_te_less_router()` runs on any machine.
* `model_parallel_cuda_manual_seed` needs CUDA RNG states; `seed_cpu` gives the same
  tensor-parallel RNG tracker with CPU generators. Activation checkpointing (selective recompute)
  saves and restores the CUDA RNG state: without CUDA that becomes a no-op.
* Under context parallelism, RoPE's `get_pos_emb_on_this_cp_rank` builds its chunk index in pinned
  memory and moves it with `.cuda()`: without CUDA the same index is built on the embedding's device.

* Without TE, Megatron's `CheckpointWithoutOutput` (selective recompute of norms / MoE activations)
  calls TE's FP8 state manager: `fix_te_less_checkpoint()` binds no-FP8 stand-ins (any device).

Apart from those two TE-less fixes, nothing here runs when CUDA is available.
"""

from __future__ import annotations

import torch

_APPLIED = False


def fix_te_less_router() -> None:
    """Bind `moe_utils.te_general_gemm = None` when TransformerEngine did not define it (any device)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def fix_te_less_checkpoint() -> None:
    """Megatron's `CheckpointWithoutOutput` (selective recompute of "layernorm" / "moe_act") sets
    ``self.fp8 = fp8 is not None``, True for its default ``fp8=False``, and then calls TransformerEngine's
    FP8 state manager, an unbound name without TE (NameError). Without TE there is no FP8: bind
    stand-ins that say so (any device)."""
    import contextlib

    from megatron.core.tensor_parallel import random as mpu_random

    if getattr(mpu_random, "HAVE_TE", True) or hasattr(mpu_random, "FP8GlobalStateManager"):
        return

    class _NoFP8:
        is_fp8_enabled = staticmethod(lambda: False)
        get_fp8_recipe = staticmethod(lambda: None)

    mpu_random.FP8GlobalStateManager = _NoFP8
    mpu_random.activation_recompute_forward = lambda *a, **k: contextlib.nullcontext()
    mpu_random.fp8_autocast = lambda *a, **k: contextlib.nullcontext()


def apply_cpu_compat() -> bool:
    """Patch megatron-core for CPU use if (and only if) CUDA is unavailable; always apply the TE-less
    fixes. Idempotent."""
    global _APPLIED
    fix_te_less_router()
    fix_te_less_checkpoint()
    if _APPLIED or torch.cuda.is_available():
        return _APPLIED
    torch.cuda.current_device = lambda: "cpu"  # device-argument use only (see module doc)
    # Megatron's activation checkpoint (selective recompute) saves and restores the CUDA RNG state;
    # without CUDA there is none to keep (the CPU generator and the tracker are still restored).
    from megatron.core.tensor_parallel import random as mpu_random

    mpu_random._get_cuda_rng_state = lambda *a, **k: None
    mpu_random._set_cuda_rng_state = lambda *a, **k: None
    from megatron.core.models.common.embeddings import rotary_pos_embedding

    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
    _APPLIED = True
    return True


def _pos_emb_on_this_cp_rank(pos_emb, seq_dim: int, cp_group):
    """Megatron's `get_pos_emb_on_this_cp_rank` (chunks r and 2·CP-1-r) without pinned memory / `.cuda()`."""
    size, rank = cp_group.size(), cp_group.rank()
    idx = torch.tensor([rank, 2 * size - 1 - rank], device=pos_emb.device)
    pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * size, -1, *pos_emb.shape[seq_dim + 1:])
    pos_emb = pos_emb.index_select(seq_dim, idx)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2:])


def seed_cpu(seed: int) -> None:
    """CPU counterpart of `model_parallel_cuda_manual_seed`: seed torch and the TP RNG tracker."""
    from megatron.core.tensor_parallel import random as mpu_random

    torch.manual_seed(seed)
    mpu_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
