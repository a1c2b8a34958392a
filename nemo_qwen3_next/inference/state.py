"""Generation state of a Qwen3-Next `GPTModel`: one slot per decoder layer, allocated once.

* Gated DeltaNet layer: ``conv [B, C, W-1]`` (the last W-1 conv inputs, model dtype) and
  ``recurrent [B, Hv, Dk, Dv]`` (fp32, the delta-rule state), for this rank's heads.
* gated attention layer: ``k``, ``v`` ``[B, G, L, D]`` pre-allocated to ``max_length`` L, for this
  rank's query groups. Token ``p`` of sequence ``b`` lives at ``[b, :, p]`` whatever the prompt
  lengths, so one mask ``slot <= position[b]`` serves every sequence.

Like HF's `Qwen3NextDynamicCache`, one object per model holds everything; unlike it, nothing is ever
re-allocated, so a decode step always touches the same addresses (what a CUDA graph needs). The
layers only read and write their slot (`inference.forward`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Union

import torch

from ..config import LINEAR


@dataclass
class GDNSlot:
    conv: torch.Tensor  # [B, C, W-1]
    recurrent: torch.Tensor  # [B, Hv, Dk, Dv] fp32


@dataclass
class KVSlot:
    k: torch.Tensor  # [B, G, L, D]
    v: torch.Tensor  # [B, G, L, D]


class InferenceState:
    """Per-layer slots for `batch` sequences of at most `max_length` tokens (prompt + generated)."""

    def __init__(self, model, batch: int, max_length: int, device=None, dtype=None):
        param = next(model.parameters())
        device = param.device if device is None else torch.device(device)
        dtype = param.dtype if dtype is None else dtype
        self.batch, self.max_length = batch, max_length
        self.slots: List[Union[GDNSlot, KVSlot]] = []
        for layer in model.decoder.layers:
            m = layer.self_attention
            if layer.layer_type == LINEAR:
                W = m.conv1d.weight.shape[-1]
                self.slots.append(GDNSlot(
                    conv=torch.zeros(batch, m.conv1d.weight.shape[0], W - 1, device=device, dtype=dtype),
                    recurrent=torch.zeros(batch, m.num_value_heads, m.key_head_dim, m.value_head_dim,
                                          device=device, dtype=torch.float32),
                ))
            else:
                shape = (batch, m.num_query_groups_per_partition, max_length, m.hidden_size_per_attention_head)
                self.slots.append(KVSlot(k=torch.zeros(shape, device=device, dtype=dtype),
                                         v=torch.zeros(shape, device=device, dtype=dtype)))

    def tensors(self) -> List[torch.Tensor]:
        """Every state tensor (GDN states first per slot, then K, V)."""
        out = []
        for s in self.slots:
            out += [s.conv, s.recurrent] if isinstance(s, GDNSlot) else [s.k, s.v]
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())
