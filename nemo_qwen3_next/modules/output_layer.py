"""The LM head that can return the loss itself: ``FusedLossOutputLayer``.

Megatron's `GPTModel._postprocess` calls ``self.output_layer(hidden)`` and then
``self.compute_language_model_loss(labels, logits)``. With labels set on the layer beforehand
(`Qwen3NextGPTModel.forward` does this), the layer skips the logits and returns the per-token loss
from `ops.linear_cross_entropy`, marked so that `compute_language_model_loss` passes it through.
Without labels (inference, evaluation that wants logits, `parallel_output=False`) it is Megatron's
`ColumnParallelLinear`, bit for bit. Relying only on those two calls keeps this independent of
`_postprocess`'s signature, which changes between megatron-core releases.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.utils import get_pg_size

from ..ops.linear_cross_entropy import linear_cross_entropy

FUSED_LOSS_ATTR = "_qwen3_next_fused_loss"


class FusedLossOutputLayer(ColumnParallelLinear):
    """`ColumnParallelLinear` (vocab-parallel LM head) + an optional fused loss (see module doc)."""

    pending_labels = None  # [b, s] global token ids, set for the duration of one model forward

    def forward(self, input_, weight=None, runtime_gather_output=None):
        labels = self.pending_labels
        if labels is None:
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        weight = self.weight if weight is None else weight
        group = self.tp_group
        if self.sequence_parallel:  # the same input mapping as the parent's linear
            x = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True, group=group)
        elif get_pg_size(group) > 1:
            x = copy_to_tensor_model_parallel_region(input_, group=group)
        else:
            x = input_
        tp = group if get_pg_size(group) > 1 else None
        # hidden states are [s, b, h]; Megatron's loss is [b, s]
        loss = linear_cross_entropy(x, weight, labels.transpose(0, 1), group=tp).transpose(0, 1).contiguous()
        setattr(loss, FUSED_LOSS_ATTR, True)
        return loss, None


def is_fused_loss(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, FUSED_LOSS_ATTR, False)
