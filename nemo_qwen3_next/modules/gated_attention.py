"""Qwen3-Next gated full attention on Megatron's `SelfAttention`.

What differs from Megatron's self-attention:

* an output gate: the q projection also yields one gate per query channel, and
  `sigmoid(gate)` multiplies the attention output before `linear_proj` (HF `q_proj` emits per
  head `[query | gate]`);
* zero-centred RMSNorm on q and k (our `RMSNorm`, via the spec's q/k_layernorm slots);
* RoPE on the first `rotary_percent` of head_dim, rotate-half convention (Megatron's
  `apply_rotary_pos_emb` with `rotary_interleaved=False` is exactly HF's partial RoPE).

`linear_qkv` layout, per query group g (np/ng query heads each)::

    [ q (np/ng·hn) | gate (np/ng·hn) | k (hn) | v (hn) ]

so a contiguous TP split of dim 0 hands each rank whole query groups, as in Megatron.
"""

from __future__ import annotations

import torch

from megatron.core.models.common.embeddings.rotary_pos_embedding import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import build_module

from .cuda_graphs import graphed_or_none


class GatedSelfAttention(SelfAttention):
    """Self-attention with Qwen3-Next's sigmoid output gate (when `config.attention_output_gate`)."""

    def __init__(self, config, submodules: SelfAttentionSubmodules, layer_number: int,
                 attn_mask_type=AttnMaskType.causal, **kwargs):
        super().__init__(config, submodules, layer_number, attn_mask_type=attn_mask_type, **kwargs)
        self.output_gate = bool(getattr(config, "attention_output_gate", False))
        if self.output_gate:  # widen linear_qkv by the gate channels
            self.linear_qkv = build_module(
                submodules.linear_qkv,
                self.config.hidden_size,
                2 * self.query_projection_size + 2 * self.kv_projection_size,
                config=self.config,
                init_method=self.config.init_method,
                gather_output=False,
                bias=self.config.add_bias_linear or self.config.add_qkv_bias,
                skip_bias_add=False,
                is_expert=False,
                tp_comm_buffer_name="qkv",
                tp_group=self.pg_collection.tp,
            )

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, split_qkv=True):
        """-> query [sq, b, np, hn], key/value [sq, b, ng, hn], gate [sq, b, np*hn] or None."""
        mixed, _ = self.linear_qkv(hidden_states)
        hn = self.hidden_size_per_attention_head
        per_group = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        mixed = mixed.view(*mixed.shape[:-1], self.num_query_groups_per_partition, -1)
        q_width = per_group * hn
        split = [q_width, q_width, hn, hn] if self.output_gate else [q_width, hn, hn]
        parts = torch.split(mixed, split, dim=-1)
        query, key, value = parts[0], parts[-2], parts[-1]
        gate = parts[1].reshape(*mixed.shape[:2], -1) if self.output_gate else None
        query = query.reshape(*query.shape[:2], -1, hn)
        if self.q_layernorm is not None:
            query = self.q_layernorm(query)
        if self.k_layernorm is not None:
            key = self.k_layernorm(key)
        return query, key, value, gate

    def forward(self, hidden_states, attention_mask=None, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                attention_bias=None, packed_seq_params=None, sequence_len_offset=None, **kwargs):
        """[sq, b, H] -> ([sq, b, H], bias). Training / prefill path; inference contexts are planned."""
        if inference_context is not None:
            raise NotImplementedError(
                "GatedSelfAttention does not support Megatron inference contexts yet (KV-cache "
                "generation is planned); run the model without inference_context."
            )
        attention_mask = _drop_trivial_mask(attention_mask, self.pg_collection.cp.size())
        rope_is_tensor = rotary_pos_emb is None or isinstance(rotary_pos_emb, torch.Tensor)
        if getattr(self.config, "mixer_cuda_graphs", False) and rope_is_tensor and attention_bias is None:
            ropes = () if rotary_pos_emb is None else (rotary_pos_emb,)
            out = graphed_or_none(self, self._unpacked_output, hidden_states, *ropes,
                                  attention_mask=attention_mask, packed_seq_params=packed_seq_params,
                                  recompute=bool(self.checkpoint_core_attention))
            if out is not None:
                return out, None
        return self._attend(hidden_states, attention_mask, rotary_pos_emb, attention_bias, packed_seq_params)

    def _unpacked_output(self, hidden_states, rotary_pos_emb=None):
        """Unmasked, unpacked attention's output alone, as `config.mixer_cuda_graphs` captures it."""
        out, bias = self._attend(hidden_states, None, rotary_pos_emb, None, None)
        if bias is not None:
            raise RuntimeError("linear_proj returns a separate bias; CUDA-graph replay supports none")
        return out

    def _attend(self, hidden_states, attention_mask, rotary_pos_emb, attention_bias, packed_seq_params):
        query, key, value, gate = self.get_query_key_value_tensors(hidden_states)

        cu_seqlens = None
        if packed_seq_params is not None:
            query, key, value = query.squeeze(1), key.squeeze(1), value.squeeze(1)
            cu_seqlens = packed_seq_params.cu_seqlens_q_padded
            cu_seqlens = packed_seq_params.cu_seqlens_q if cu_seqlens is None else cu_seqlens

        if rotary_pos_emb is not None:
            q_emb, k_emb = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
            cp_group = self.pg_collection.cp
            query = apply_rotary_pos_emb(query, q_emb, config=self.config, cu_seqlens=cu_seqlens, cp_group=cp_group)
            key = apply_rotary_pos_emb(key, k_emb, config=self.config, cu_seqlens=cu_seqlens, cp_group=cp_group)

        attn = self._checkpointed_attention_forward if (self.checkpoint_core_attention and self.training) \
            else self.core_attention
        out = attn(query, key, value, attention_mask, attn_mask_type=self.attn_mask_type,
                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        if packed_seq_params is not None:
            out = out.reshape(out.shape[0], 1, -1)  # [t, h] -> [t, 1, h]
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.linear_proj(out)


def _drop_trivial_mask(attention_mask, cp_size: int):
    """``None`` for a mask of one element per sample (``[b, 1, 1, 1]``): NeMo's forward step needs *some*
    mask without TransformerEngine, and `training.data.MockDataset` sends one ``False`` (nothing padded).
    Such a mask can only say "attend causally" (False) or "attend to nothing" (True, a NaN output), so it is
    dropped after an *asynchronous* device check that it is False: no host sync, no ``[s, s]`` mask per step,
    SDPA's flash kernel, and the mixer stays CUDA-graphable. Under CP the mask is gathered, so it is kept."""
    if attention_mask is None or cp_size != 1 or attention_mask.dim() < 2 or attention_mask.shape[-2:] != (1, 1):
        return attention_mask
    torch._assert_async(~attention_mask.any(), "attention_mask [b, 1, 1, 1] is True (every key masked): send False, or a dense [b, 1, s, s] mask")
    return None

