"""Causal softmax attention through `torch.nn.functional.scaled_dot_product_attention`.

The local (non-TransformerEngine) core attention of our spec. Megatron's own
`DotProductAttention` materialises the score matrix in a CUDA global buffer; SDPA runs on CPU
and picks flash / memory-efficient kernels on GPU, handles GQA without copies, and takes
packed sequences (`cu_seqlens`) through a block-diagonal causal mask. Under context parallelism
K/V are all-gathered over the CP group and each query gets its global causal offset
(`parallel.context.gather_kv`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from ..parallel.context import cp_group_or_none, gather_kv


def block_causal_mask(cu_seqlens: torch.Tensor, total: int, device) -> torch.Tensor:
    """Boolean [T, T] mask, True where a token may attend: causal and inside its own document."""
    pos = torch.arange(total, device=device)
    doc = torch.bucketize(pos, cu_seqlens.to(device)[1:], right=True)
    return (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])


class SDPAttention(MegatronModule):
    """Same constructor and call signature as Megatron's `DotProductAttention`."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        pg_collection=None,
        **_unused,
    ):
        super().__init__(config=config)
        self.cp_group = cp_group_or_none(pg_collection)  # None: no context parallelism
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **_unused):
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] (or [t, n, hn] when packed) -> [sq, b, np*hn]."""
        packed = packed_seq_params is not None
        cu = None
        if packed:
            cu = packed_seq_params.cu_seqlens_q_padded
            cu = packed_seq_params.cu_seqlens_q if cu is None else cu
        mask = None
        if self.cp_group is not None:  # global cu_seqlens under CP (Megatron's THD convention)
            key, value, mask = gather_kv(key, value, self.cp_group, attention_mask, cu)
        if packed:  # thd: add the dummy batch dim back
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        if packed and self.cp_group is None:
            mask = block_causal_mask(cu, q.shape[2], q.device)
        elif attention_mask is not None and self.cp_group is None:  # under CP, gather_kv's mask has it
            # Megatron masks are True where attention is *not* allowed.
            causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
            mask = causal & ~attention_mask
            # NeMo without TransformerEngine sends a dense causal mask with every batch; an explicit
            # mask rules out SDPA's flash kernel, so drop it when it adds nothing to `is_causal`.
            if q.shape[2] == k.shape[2] and bool((mask == causal).all()):
                mask = None
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None,  # never under CP (gather_kv gives a mask)
            scale=self.softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        out = out.permute(2, 0, 1, 3)  # [s, b, np, hn]
        if packed:
            return out.reshape(out.shape[0], -1)
        return out.reshape(out.shape[0], out.shape[1], -1)
