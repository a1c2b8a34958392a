"""The one place where we adapt megatron-core 0.15 to machines without CUDA.

megatron-core assumes a GPU in a few spots that do not matter for the math (measured on
0.15.3, see shared/CPU_NOTES.md):

* `torch.cuda.current_device()` used as a *device argument* (rotary embeddings, the global
  memory buffer used by sequence-parallel gathers, router buffers, the MoE router moving its
  weight "to the GPU"). Without CUDA we answer ``"cpu"``, which every such call site accepts.
* `moe_utils.te_general_gemm` is an unbound name when TransformerEngine is absent (NameError
  in the router); it must be ``None`` so the plain `torch.mm` path runs.
* `model_parallel_cuda_manual_seed` needs CUDA RNG states; `seed_cpu` gives the same
  tensor-parallel RNG tracker with CPU generators.

Nothing here runs when CUDA is available: `apply_cpu_compat()` is a no-op there.
"""

from __future__ import annotations

import torch

_APPLIED = False


def apply_cpu_compat() -> bool:
    """Patch megatron-core for CPU use if (and only if) CUDA is unavailable. Idempotent."""
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return _APPLIED
    torch.cuda.current_device = lambda: "cpu"  # device-argument use only (see module doc)

    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    _APPLIED = True
    return True


def seed_cpu(seed: int) -> None:
    """CPU counterpart of `model_parallel_cuda_manual_seed`: seed torch and the TP RNG tracker."""
    from megatron.core.tensor_parallel import random as mpu_random

    torch.manual_seed(seed)
    mpu_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
