"""The model's forward with generation state: packed prefill and one-token decode steps.

The walk is `GPTModel`'s own (embedding, per layer ``x + mixer(norm(x))`` then ``x + mlp(norm(x))``,
final norm, LM head) over the model's own modules; only the two sequence mixers are called here
differently, because their training forward keeps no state:

* prefill: every prompt packed into one row (``cu_seqlens``, no padding computed): the GDN layer runs
  the chunked rule and the conv with ``output_final_state`` (one state per prompt), attention runs
  the layer's core attention over the packed documents and writes each prompt's K/V into its cache
  rows. Per-document RoPE positions restart at 0, so a prompt's result does not depend on its
  neighbours (= HF's left-padded batch, whose positions count real tokens only).
* decode: one token per sequence at its own position: `ops.causal_conv1d_update` and the recurrent
  rule (fla's fused recurrent kernel on CUDA) on the GDN state, attention of the new query over the
  cache under the mask ``slot <= position``. A speculative verify step (`inference.speculative`) is a
  decode of ``s > 1`` tokens per sequence: the GDN layer runs those single-token updates ``s`` times
  and, with ``Batch(keep_states=True)``, keeps every step's conv and recurrent state for the rollback.

Everything a decode step does has fixed shapes and no host synchronisation when ``sync_free=True``
(the MoE then runs `moe_forward_sync_free`: the layer itself where its top-k permutation and grouped
experts apply, else a form without host-sized splits): that step is what `inference.cuda_graph` captures.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import apply_rotary_pos_emb
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.moe.moe_layer import MoELayer

from ..config import LINEAR
from ..modules.grouped_experts import GroupedSequentialMLP
from ..ops import causal_conv1d, causal_conv1d_update, gated_delta_rule
from .state import GDNSlot, InferenceState, KVSlot


class Batch:
    """Where each token of one forward call belongs.

    prefill: ``positions [T, 1]`` (per-document 0..n-1), ``cu_seqlens [N+1]`` (int32) over the packed row;
    decode: ``positions [s, B]``, the cache slots of each sequence's ``s`` new tokens (``s = 1`` but in a
    speculative verify step); ``cu_seqlens`` None. ``keep_states`` (decode): every GDN layer appends
    ``(conv [s, B, C, W-1], recurrent [s, B, Hv, K, V])``, its state after each of the ``s`` tokens, to
    ``gdn_states``.
    """

    def __init__(self, positions: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: int = 0,
                 keep_states: bool = False):
        self.positions, self.cu_seqlens, self.max_seqlen = positions, cu_seqlens, max_seqlen
        self.bounds = None if cu_seqlens is None else cu_seqlens.tolist()  # prefill only (host values)
        self.gdn_states = [] if keep_states else None

    @property
    def prefill(self) -> bool:
        return self.cu_seqlens is not None


def _add(residual, out_with_bias):
    out, bias = out_with_bias if isinstance(out_with_bias, tuple) else (out_with_bias, None)
    return residual + out if bias is None else residual + out + bias


def forward(model, state: InferenceState, tokens: torch.Tensor, batch: Batch, rope: torch.Tensor,
            sync_free: bool = False, return_hidden: bool = False):
    """``tokens [s, b]`` (packed prompts ``[T, 1]`` or ``s`` tokens per sequence ``[s, B]``) -> logits
    (full vocabulary, gathered over TP): ``[N, V]`` of each prompt's last token, ``[B, V]`` of a one-token
    step, ``[s, B, V]`` of every token of a multi-token step.

    ``rope`` is the model's RoPE table ``[L, 1, 1, d]`` (`rope_table`). ``return_hidden``: also return the
    last decoder layer's output ``[s, b, H]`` at every token, before the final norm (what an MTP drafter reads).
    """
    h = model.embedding(input_ids=tokens.t(), position_ids=batch.positions.t())  # [s, b, H]
    freqs = rope[:, 0, 0][batch.positions].unsqueeze(2)  # [s, b, 1, d]
    for layer, slot in zip(model.decoder.layers, state.slots):
        x = layer.input_layernorm(h)
        if layer.layer_type == LINEAR:
            h = _add(h, gdn_forward(layer.self_attention, x, slot, batch))
        else:
            h = _add(h, attention_forward(layer.self_attention, x, slot, batch, freqs))
        x = layer.pre_mlp_layernorm(h)
        sync_free_moe = sync_free and isinstance(layer.mlp, MoELayer)
        h = _add(h, moe_forward_sync_free(layer.mlp, x) if sync_free_moe else layer.mlp(x))
    hidden = h
    if batch.prefill:  # only each prompt's last token goes through the LM head
        h = h[batch.cu_seqlens[1:].long() - 1].transpose(0, 1)  # [1, N, H]
    logits = lm_head(model, h)
    logits = logits[0] if logits.shape[0] == 1 else logits
    return (logits, hidden) if return_hidden else logits


def lm_head(model, h: torch.Tensor) -> torch.Tensor:
    """The final norm and the output layer: ``h [s, b, H]`` -> logits ``[s, b, V]`` (gathered over TP)."""
    h = model.decoder.final_layernorm(h)
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    logits, _ = model.output_layer(h, weight=weight, runtime_gather_output=True)
    return logits


def rope_table(model, max_length: int) -> torch.Tensor:
    """The model's RoPE angles for positions ``0..max_length-1`` (``[L, 1, 1, d]``)."""
    return model.rotary_pos_emb(max_length)


def gdn_forward(m, x: torch.Tensor, slot: GDNSlot, batch: Batch):
    """`GatedDeltaNet` with state: ``x [s, b, H]`` -> its ``(out, bias)``; updates ``slot``.

    The module's own projections, conv weight, gates and norm; its per-key-head in_proj layout is
    read through `GatedDeltaNet._in_proj_rows` (conv channels ``[q k v]``, then ``[z | b | a]``).
    """
    proj, _ = m.in_proj(x)
    proj = proj.transpose(0, 1)  # [b, s, Hk·G]
    rows_qkv, rows_zba = m._in_proj_rows(proj.device)
    qkv, zba = proj.index_select(-1, rows_qkv), proj.index_select(-1, rows_zba)
    b, s = qkv.shape[:2]
    w = m.conv1d.weight.squeeze(1)
    if batch.prefill:
        qkv, conv_state = causal_conv1d(qkv, w, activation="silu", cu_seqlens=batch.cu_seqlens,
                                        output_final_state=True, backend=m.backend)
        slot.conv.copy_(conv_state)
    else:  # token by token: a verify step's states are then those of s one-token decode steps
        convs = []
        for i in range(s):
            y = causal_conv1d_update(qkv[:, i], slot.conv, w, activation="silu")
            convs.append((y, slot.conv.clone() if batch.gdn_states is not None else None))
        qkv = torch.stack([y for y, _ in convs], dim=1)
    Hv, dk, dv = m.num_value_heads, m.key_head_dim, m.value_head_dim
    q, k, v = torch.split(qkv.view(b, s, m.num_key_heads, m.conv_group), [dk, dk, m.heads_per_key * dv], dim=-1)
    z, beta, a = torch.split(zba, [Hv * dv, Hv, Hv], dim=-1)
    v = v.reshape(b, s, Hv, dv)
    rule = dict(use_qk_l2norm=True, A_log=m.A_log, dt_bias=m.dt_bias, beta_is_logits=True, output_final_state=True,
                chunk_size=m.chunk_size, backend=m.backend)
    if batch.prefill:
        o, final = gated_delta_rule(q, k, v, a, beta, cu_seqlens=batch.cu_seqlens, **rule)
        slot.recurrent.copy_(final)
    else:
        outs, finals = [], []
        for i in range(s):
            t = slice(i, i + 1)
            o, final = gated_delta_rule(q[:, t], k[:, t], v[:, t], a[:, t], beta[:, t], initial_state=slot.recurrent,
                                        use_recurrent=True, **rule)
            slot.recurrent.copy_(final)
            outs.append(o)
            finals.append(final)
        o = outs[0] if s == 1 else torch.cat(outs, dim=1)
        if batch.gdn_states is not None:
            batch.gdn_states.append((torch.stack([c for _, c in convs]), torch.stack(finals)))
    o = m.out_norm(o, z.reshape(b, s, Hv, dv)).reshape(b, s, Hv * dv)
    return m.out_proj(o.transpose(0, 1).contiguous())


def attention_forward(m, x: torch.Tensor, slot: KVSlot, batch: Batch, freqs: torch.Tensor):
    """`GatedSelfAttention` with a KV cache: ``x [s, b, H]`` -> its ``(out, bias)``; writes K/V into ``slot``."""
    query, key, value, gate = m.get_query_key_value_tensors(x)  # [s, b, n|g, d]
    query = apply_rotary_pos_emb(query, freqs, config=m.config)
    key = apply_rotary_pos_emb(key, freqs, config=m.config)
    if batch.prefill:  # the layer's own core attention over the packed prompts, then fill the cache
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=batch.cu_seqlens, cu_seqlens_kv=batch.cu_seqlens,
                                 max_seqlen_q=batch.max_seqlen, max_seqlen_kv=batch.max_seqlen)
        out = m.core_attention(query.squeeze(1), key.squeeze(1), value.squeeze(1), None,
                               attn_mask_type=m.attn_mask_type, packed_seq_params=params)
        out = out.reshape(out.shape[0], 1, -1)
        for n, (s0, e0) in enumerate(zip(batch.bounds[:-1], batch.bounds[1:])):
            slot.k[n, :, : e0 - s0] = key[s0:e0, 0].transpose(0, 1)
            slot.v[n, :, : e0 - s0] = value[s0:e0, 0].transpose(0, 1)
    else:  # s new tokens per sequence (s = 1 but in a verify step), each seeing the cache up to itself
        pos = batch.positions  # [s, B]
        rows = torch.arange(pos.shape[1], device=pos.device).expand_as(pos)
        slot.k[rows, :, pos] = key
        slot.v[rows, :, pos] = value
        visible = torch.arange(slot.k.shape[2], device=pos.device) <= pos.t()[:, :, None]  # [B, s, L]
        q = query.permute(1, 2, 0, 3)  # [B, n, s, d]
        scale = getattr(m.config, "softmax_scale", None) or q.shape[-1] ** -0.5
        out = F.scaled_dot_product_attention(q, slot.k, slot.v, attn_mask=visible[:, None], scale=scale,
                                             enable_gqa=q.shape[1] != slot.k.shape[1])
        out = out.permute(2, 0, 1, 3).reshape(pos.shape[0], q.shape[0], -1)  # [s, B, n·d]
    if gate is not None:
        out = out * torch.sigmoid(gate)
    return m.linear_proj(out)


def moe_forward_sync_free(mlp: MoELayer, x: torch.Tensor):
    """The `MoELayer`'s ``(output, bias)`` without host syncs, for a captured decode step.

    Where `Qwen3NextMoELayer` permutes tokens from the top-k indices and the experts run as grouped GEMMs
    (TP x EP = 1, sm90+ bf16 or forced), the layer itself is sync-free. Elsewhere the expert loop splits
    tokens by counts read on the host, so here every expert runs on every token with its routing weight,
    zero for tokens not routed to it: the same sum, fixed shapes, E small GEMMs (the router and the gated
    shared expert are the layer's own).
    """
    experts = mlp.experts
    if getattr(mlp, "fast_permute_off", None) == "" and isinstance(experts, GroupedSequentialMLP) \
            and experts._grouped(x):
        return mlp(x)
    x2 = x.reshape(-1, x.shape[-1])
    probs, _ = mlp.router(x2)  # [N, E], zero outside each token's top-k
    out = torch.zeros_like(x2)
    for e, expert in enumerate(experts.local_experts):
        y, _ = expert(x2, probs[:, e])
        out += y.to(x2.dtype)
    if mlp.use_shared_expert:
        out = out + mlp.shared_experts(x2)
    return out.view(x.shape), None
