"""Qwen3-Next multi-token prediction (MTP): the block, its loss, and a full-sequence reference.

HF ``mtp.*`` (``num_nextn_predict_layers: 1``) is megatron-core's `MultiTokenPredictionLayer`, part for
part, so we build that class from our own specs rather than writing a second block:

======================================  ===========================================  ==========================
HF tensor                               ours (``GPTModel.state_dict()``)             `mtp_parts` name
======================================  ===========================================  ==========================
``mtp.pre_fc_norm_embedding.weight``    ``mtp.layers.0.enorm.weight``                ``pre_fc_norm_embedding``
``mtp.pre_fc_norm_hidden.weight``       ``mtp.layers.0.hnorm.weight``                ``pre_fc_norm_hidden``
``mtp.fc.weight`` [H, 2H]               ``mtp.layers.0.eh_proj.weight``              ``fc``
``mtp.layers.0.<decoder layer>``        ``mtp.layers.0.transformer_layer.<ours>``    ``layer``
``mtp.norm.weight``                     ``mtp.layers.0.final_layernorm.weight``      ``norm``
======================================  ===========================================  ==========================

Math at position t (verified against vLLM's ``qwen3_next_mtp.py`` + ``Qwen3NextModel.forward`` and
megatron-core's `MultiTokenPredictionLayer`, which agree): ``h_t`` is the main model's last hidden state
**after** its final norm (vLLM hands the MTP the output of ``self.norm``; megatron the decoder output,
which includes ``final_layernorm``), ``e_{t+1}`` the shared embedding of token t+1;
``x = fc([pre_fc_norm_embedding(e_{t+1}) ; pre_fc_norm_hidden(h_t)])`` (embedding first), one full-attention
+ MoE decoder layer at RoPE position t, ``mtp.norm``, then the shared LM head: logits for token t+2.
All norms are the zero-centred ``(1 + w)`` RMSNorm of the main model (vLLM uses ``GemmaRMSNorm`` for all four).

What megatron-core's `GPTModel._postprocess` does not fit, `mtp_postprocess` replaces: its MTP branch
clones ``labels`` even when there are none (inference), computes full fp32 logits for the MTP loss (ours
goes through the fused LM head + CE of `output_layer.FusedLossOutputLayer`), and logs to a tracker that
NeMo never reads (ours: `MTPLossTracker`, read by the training callback). Gradients flow exactly as in
megatron: ``mtp_loss_scaling_factor / mtp_num_layers * mean MTP loss`` is attached to the main hidden
states with `MTPLossAutoScaler`, so the returned (and logged) LM loss stays the main one.

For inference (`inference/speculative.py`): `mtp_parts(model)` names the submodules, `mtp_logits_reference`
runs the block over a whole sequence from the **pre**-final-norm hidden states (it applies the main model's
final norm itself), `hidden_before_final_norm` returns those from a plain forward.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from megatron.core.tensor_parallel import (
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.multi_token_prediction import (
    MTPLossAutoScaler,
    MultiTokenPredictionBlock,
    MultiTokenPredictionBlockSubmodules,
    MultiTokenPredictionLayer,
    MultiTokenPredictionLayerSubmodules,
    get_mtp_num_layers_to_build,
    roll_tensor,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)
from megatron.core.utils import get_pg_rank

from ..config import FULL


class Qwen3NextMTPTransformerLayer(TransformerLayer):
    """The MTP block's decoder layer: always gated full attention (+ MoE when the model has experts).

    Megatron builds it with ``layer_number=1``; it is renumbered after the decoder's layers
    (global number ``num_layers + k``) so that the MoE aux-loss tracker (sized ``num_layers +
    mtp_num_layers``) and any per-layer cache keyed by ``layer_number`` see a layer of its own."""

    def __init__(self, config, submodules: TransformerLayerSubmodules, layer_number: int = 1,
                 hidden_dropout=None, pg_collection=None, vp_stage=None):
        from megatron.core.process_groups_config import ProcessGroupCollection

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        offset = get_transformer_layer_offset(config, vp_stage, get_pg_rank(pg_collection.pp))
        super().__init__(config, submodules, config.num_layers + layer_number - offset, hidden_dropout,
                         pg_collection, vp_stage)
        self.layer_index = config.num_layers + layer_number - 1  # 0-based, after the decoder's
        self.layer_type = FULL


def get_mtp_block_spec(config, layer_spec: ModuleSpec, vp_stage: Optional[int] = None,
                       pp_rank: Optional[int] = None) -> Optional[ModuleSpec]:
    """`MultiTokenPredictionBlock` spec from our decoder layer spec (`spec.get_qwen3_next_layer_spec`),
    or None when ``config.mtp_num_layers`` is unset or this pipeline stage holds no MTP layer
    (megatron places them all on the last stage)."""
    if not getattr(config, "mtp_num_layers", None):
        return None
    if get_mtp_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank) == 0:
        return None
    s = layer_spec.submodules  # Qwen3NextLayerSubmodules: the candidate parts
    layer = ModuleSpec(
        module=Qwen3NextMTPTransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=s.input_layernorm, self_attention=s.full_attention, self_attn_bda=s.self_attn_bda,
            pre_mlp_layernorm=s.pre_mlp_layernorm, mlp=s.moe if config.num_moe_experts else s.dense_mlp,
            mlp_bda=s.mlp_bda,
        ),
    )
    linear = s.full_attention.submodules.linear_qkv  # the backend's column-parallel linear
    one = ModuleSpec(
        module=MultiTokenPredictionLayer,
        submodules=MultiTokenPredictionLayerSubmodules(
            enorm=s.input_layernorm, hnorm=s.input_layernorm, eh_proj=linear,
            transformer_layer=layer, layer_norm=s.input_layernorm,
        ),
    )
    return ModuleSpec(module=MultiTokenPredictionBlock,
                      submodules=MultiTokenPredictionBlockSubmodules(layer_specs=[one] * config.mtp_num_layers))


# ---------------------------------------------------------------------- inference interface
@dataclass
class MTPParts:
    """One MTP layer's submodules under their HF names (see the module table).

    ``fc`` is a column-parallel linear: ``fc(x)`` returns ``(y, None)`` with ``y`` this rank's slice
    of H under TP (gather it, as `mtp_logits_reference` does). ``layer`` is a Megatron
    `TransformerLayer` (gated full attention + MoE): ``layer(hidden_states=[s, b, H],
    attention_mask=None, rotary_pos_emb=...)`` returns ``(out, context)``."""

    pre_fc_norm_embedding: torch.nn.Module
    pre_fc_norm_hidden: torch.nn.Module
    fc: torch.nn.Module
    layer: torch.nn.Module
    norm: torch.nn.Module


def has_mtp(model) -> bool:
    return getattr(model, "mtp", None) is not None and getattr(model, "mtp_process", False)


def mtp_parts(model, depth: int = 0) -> MTPParts:
    """The submodules of MTP layer ``depth`` of a `Qwen3NextGPTModel` built with ``mtp_num_layers``."""
    if not has_mtp(model):
        raise ValueError("this model has no MTP block: build it with mtp_num_layers >= 1 (HF "
                         "num_nextn_predict_layers; Qwen3NextConfig.from_hf sets it)")
    m = model.mtp.layers[depth]
    return MTPParts(m.enorm, m.hnorm, m.eh_proj, m.transformer_layer, m.final_layernorm)


@torch.no_grad()
def hidden_before_final_norm(model, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None
                             ) -> torch.Tensor:
    """The main model's last-layer output **before** its final norm, ``[B, T, H]``, for ``input_ids [B, T]``
    (one plain forward; the input of ``model.decoder.final_layernorm`` is captured by a hook)."""
    seen: List[torch.Tensor] = []
    hook = model.decoder.final_layernorm.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
        with _mtp_disabled(model):
            model(input_ids=input_ids, position_ids=position_ids, attention_mask=None)
    finally:
        hook.remove()
    h = seen[-1]
    if model.config.sequence_parallel:  # [s/tp, b, h] on each rank
        h = gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=False)
    return h.transpose(0, 1).contiguous()


@torch.no_grad()
def mtp_logits_reference(model, hidden_states: torch.Tensor, next_token_ids: torch.Tensor,
                         depth: int = 0, position_offset: int = 0) -> torch.Tensor:
    """MTP logits ``[B, T, V]`` over a whole sequence (no cache): at position t, the distribution of
    token t+2 given the main model's state at t and token t+1.

    ``hidden_states [B, T, H]``: the main model's last-layer output **before** the final norm at positions
    ``position_offset .. +T-1`` (`hidden_before_final_norm`; `inference.forward(return_hidden=True)`);
    the main final norm is applied here. ``next_token_ids [B, T]``: ``next_token_ids[:, t]`` is the token
    at position t+1. Attention is causal over these T positions only. Inputs and output are full
    (every TP rank passes the same tensors; sequence parallelism is handled inside)."""
    if hidden_states.dim() != 3 or next_token_ids.shape != hidden_states.shape[:2]:
        raise ValueError(f"hidden_states {tuple(hidden_states.shape)} must be [B, T, H] and next_token_ids "
                         f"{tuple(next_token_ids.shape)} [B, T] with the same B, T")
    p = mtp_parts(model, depth)
    B, T = next_token_ids.shape
    h = model.decoder.final_layernorm(hidden_states.transpose(0, 1).contiguous())  # [T, B, H]
    positions = torch.arange(position_offset, position_offset + T, device=next_token_ids.device)
    emb = model.embedding(input_ids=next_token_ids, position_ids=positions[None].expand(B, T))  # [T, B, H]
    sp = model.config.sequence_parallel  # then the embedding, fc input and layer are [T/tp, B, H]
    tp = model.config.tensor_model_parallel_size
    if sp and T % tp:
        raise ValueError(f"sequence parallel: T = {T} positions must be a multiple of the TP size {tp}; pad the "
                         f"sequence or run without sequence_parallel")
    if sp:
        h = scatter_to_sequence_parallel_region(h)
    x, _ = p.fc(torch.cat([p.pre_fc_norm_embedding(emb), p.pre_fc_norm_hidden(h)], dim=-1))
    x = gather_from_tensor_model_parallel_region(x)  # as megatron's MultiTokenPredictionLayer
    if sp:
        x = scatter_to_sequence_parallel_region(x)
    rope = model.rotary_pos_emb(position_offset + T)[position_offset:]
    x, _ = p.layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)
    x = p.norm(x)
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    with _labels_off(model):
        logits, _ = model.output_layer(x, weight=weight, runtime_gather_output=True)
    return logits.transpose(0, 1).contiguous()


@contextmanager
def _labels_off(model):
    layer = model.output_layer
    saved = getattr(layer, "pending_labels", None)
    layer.pending_labels = None
    try:
        yield
    finally:
        layer.pending_labels = saved


@contextmanager
def _mtp_disabled(model):
    """Megatron's `_postprocess` without its MTP branch (which needs labels)."""
    saved = model.mtp_process
    model.mtp_process = False
    try:
        yield
    finally:
        model.mtp_process = saved


# ---------------------------------------------------------------------- training: loss and its log
class MTPLossTracker:
    """Per-depth MTP loss of the current optimizer step: mean over its microbatches (detached).

    `mtp_postprocess` adds one value per microbatch and depth; the training callback reads it with
    `pop()` once per step. Process-local: averaging over data-parallel ranks is the reader's job."""

    _sums: Dict[int, torch.Tensor] = {}
    _counts: Dict[int, int] = {}

    @classmethod
    def add(cls, depth: int, loss: torch.Tensor) -> None:
        v = loss.detach().float()
        cls._sums[depth] = cls._sums[depth] + v if depth in cls._sums else v
        cls._counts[depth] = cls._counts.get(depth, 0) + 1

    @classmethod
    def pop(cls) -> Dict[int, torch.Tensor]:
        out = {d: cls._sums[d] / cls._counts[d] for d in sorted(cls._sums)}
        cls._sums, cls._counts = {}, {}
        return out


def mtp_postprocess(model, super_postprocess, hidden_states, input_ids, position_ids, labels,
                    rotary_pos_emb, rotary_pos_cos, rotary_pos_sin, loss_mask=None, attention_mask=None,
                    inference_params=None, packed_seq_params=None, sequence_len_offset=None,
                    extra_block_kwargs=None, **rest):
    """`GPTModel._postprocess` with MTP (see the module doc). Without labels: the main logits only."""
    rest.pop("mtp_in_postprocess", None)

    def main_postprocess(hidden):  # megatron's own, with the MTP block switched off
        with _mtp_disabled(model):
            return super_postprocess(hidden_states=hidden, input_ids=input_ids, position_ids=position_ids,
                                     labels=labels, rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos,
                                     rotary_pos_sin=rotary_pos_sin, mtp_in_postprocess=False, loss_mask=loss_mask,
                                     attention_mask=attention_mask, inference_params=inference_params,
                                     packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset,
                                     extra_block_kwargs=extra_block_kwargs, **rest)

    if labels is None or not model.post_process:
        return main_postprocess(hidden_states)
    cfg = model.config
    n = cfg.mtp_num_layers
    stacked = model.mtp(input_ids=input_ids, position_ids=position_ids, hidden_states=hidden_states,
                        attention_mask=attention_mask, inference_params=inference_params,
                        rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
                        packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset,
                        embedding=model.embedding, **(extra_block_kwargs or {}))
    chunks = torch.chunk(stacked, 1 + n, dim=0)
    hidden_states = chunks[0]
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    mtp_labels = labels
    mask = torch.ones_like(labels) if loss_mask is None else loss_mask
    layer = model.output_layer
    main_labels = getattr(layer, "pending_labels", None)
    scale = (cfg.mtp_loss_scaling_factor if cfg.mtp_loss_scaling_factor is not None else 0.1) / n
    for depth in range(n):
        mtp_labels, _ = roll_tensor(mtp_labels, shifts=-1, dims=-1, cp_group=model.cp_group)
        mask, num_tokens = roll_tensor(mask, shifts=-1, dims=-1, cp_group=model.cp_group)
        if main_labels is not None:  # the fused LM head + CE, on the rolled labels
            layer.pending_labels = mtp_labels
        try:
            out, _ = layer(chunks[depth + 1], weight=weight, runtime_gather_output=rest.get("runtime_gather_output"))
        finally:
            layer.pending_labels = main_labels
        loss = model.compute_language_model_loss(mtp_labels, out) * mask  # [b, s]
        num_tokens = num_tokens.clamp(min=1)
        if model.training:
            MTPLossTracker.add(depth, loss.sum() / num_tokens)
        if cfg.calculate_per_token_loss:
            hidden_states = MTPLossAutoScaler.apply(hidden_states, scale * loss)
        else:
            hidden_states = MTPLossAutoScaler.apply(hidden_states, scale * loss / num_tokens)
    return main_postprocess(hidden_states)
