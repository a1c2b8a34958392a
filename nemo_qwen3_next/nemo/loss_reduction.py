"""A training loss reduction with no host synchronisation.

NeMo's `MaskedTokenLossReduction.reduce` drops micro-batches without valid tokens with a Python
`if x[1] > 0` per micro-batch: each is a device-to-host copy that drains the CUDA queue in the middle
of the step, so the Python NeMo runs afterwards (logging, callbacks, the optimizer's setup) is no
longer hidden behind queued kernels. Measured on the reduced 80B-A3B model (B=2 T=4096) that is
~5 ms of a ~112 ms step. Here the empty micro-batches are zeroed with `torch.where` instead, so the
value is the same and nothing waits for the GPU.
"""

from __future__ import annotations

import torch
from nemo.collections.llm.gpt.model.base import MaskedTokenLossReduction


class SyncFreeMaskedTokenLossReduction(MaskedTokenLossReduction):
    """`MaskedTokenLossReduction` whose `reduce` never reads a device value on the host."""

    def reduce(self, losses_reduced_per_micro_batch) -> torch.Tensor:
        if not losses_reduced_per_micro_batch or "avg" in losses_reduced_per_micro_batch[0]:
            return super().reduce(losses_reduced_per_micro_batch)
        from megatron.core import parallel_state

        per_mb = torch.vstack([x["loss_sum_and_ub_size"] for x in losses_reduced_per_micro_batch])
        # rows with no valid tokens count as (0, 0), exactly as NeMo's filter leaves them out
        loss = torch.where(per_mb[:, 1:2] > 0, per_mb, torch.zeros_like(per_mb)).sum(dim=0)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(
                loss, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        return loss[0] / loss[1]
