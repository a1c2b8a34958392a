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
  tensor-parallel RNG tracker with CPU generators.

Apart from that router fix, nothing here runs when CUDA is available.
"""

from __future__ import annotations

import torch

_APPLIED = False


def fix_te_less_router() -> None:
    """Bind `moe_utils.te_general_gemm = None` when TransformerEngine did not define it (any device)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def apply_cpu_compat() -> bool:
    """Patch megatron-core for CPU use if (and only if) CUDA is unavailable; always fix the TE-less
    router. Idempotent."""
    global _APPLIED
    fix_te_less_router()
    if _APPLIED or torch.cuda.is_available():
        return _APPLIED
    torch.cuda.current_device = lambda: "cpu"  # device-argument use only (see module doc)
    _APPLIED = True
    return True


def seed_cpu(seed: int) -> None:
    """CPU counterpart of `model_parallel_cuda_manual_seed`: seed torch and the TP RNG tracker."""
    from megatron.core.tensor_parallel import random as mpu_random

    torch.manual_seed(seed)
    mpu_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
