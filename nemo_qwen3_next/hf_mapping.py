"""The one table between Hugging Face Qwen3-Next weights and ours, both directions.

`weight_plan(config)` expands the table into concrete entries, one per tensor of ours::

    Entry(ours="decoder.layers.0.self_attention.in_proj.weight",
          hf=("model.layers.0.linear_attn.in_proj_qkvz.weight", "model.layers.0.linear_attn.in_proj_ba.weight"),
          to_ours=<[hf tensors] -> ours>, to_hf=<ours -> [hf tensors]>)

Converters stream through the plan tensor by tensor, so nothing ever holds the whole model,
and can check that every HF tensor is consumed and every tensor of ours filled exactly once.
Names of ours are the keys of Megatron `GPTModel.state_dict()` at TP=1 (global tensors).

Layout changes (everything else is a rename):

* GDN ``in_proj``: HF ``in_proj_qkvz`` (per key head ``[q k v z]``) and ``in_proj_ba`` (per key
  head ``[b a]``) become one matrix, per key head ``[q k v z b a]``.
* GDN ``conv1d``: HF channels ``[q_all | k_all | v_all]`` become per key head ``[q k v]``.
* Attention ``linear_qkv``: HF ``q_proj`` (per head ``[q | gate]``), ``k_proj``, ``v_proj`` become
  per query group ``[q… | gate… | k | v]``.
* MLPs: ``gate_proj`` and ``up_proj`` stack into ``linear_fc1`` (``[gate; up]``, SwiGLU order).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, List, Sequence, Tuple

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Entry:
    ours: str
    hf: Tuple[str, ...]
    to_ours: Callable[[Sequence[Tensor]], Tensor]
    to_hf: Callable[[Tensor], List[Tensor]]


def _same(ts):
    return ts[0]


def _one(t):
    return [t]


# ---------------------------------------------------------------------- GDN layouts
def _gdn_dims(c):
    hk = c.linear_num_key_heads
    r = c.linear_num_value_heads // hk
    return hk, r, c.linear_key_head_dim, c.linear_value_head_dim


def gdn_in_proj_to_ours(c, qkvz: Tensor, ba: Tensor) -> Tensor:
    hk, r, dk, dv = _gdn_dims(c)
    h = qkvz.shape[-1]
    return torch.cat([qkvz.reshape(hk, -1, h), ba.reshape(hk, 2 * r, h)], dim=1).reshape(-1, h)


def gdn_in_proj_to_hf(c, w: Tensor) -> List[Tensor]:
    hk, r, dk, dv = _gdn_dims(c)
    h = w.shape[-1]
    w = w.reshape(hk, -1, h)
    n_qkvz = 2 * dk + 2 * r * dv
    return [w[:, :n_qkvz].reshape(-1, h).contiguous(), w[:, n_qkvz:].reshape(-1, h).contiguous()]


def gdn_conv_perm(c) -> Tensor:
    """`perm[i]` = HF conv channel that our channel i holds."""
    hk, r, dk, dv = _gdn_dims(c)
    key_dim = hk * dk
    idx = []
    for h in range(hk):
        idx += range(h * dk, (h + 1) * dk)  # q
        idx += range(key_dim + h * dk, key_dim + (h + 1) * dk)  # k
        idx += range(2 * key_dim + h * r * dv, 2 * key_dim + (h + 1) * r * dv)  # v
    return torch.tensor(idx)


def gdn_conv_to_ours(c, w: Tensor) -> Tensor:
    return w[gdn_conv_perm(c)].contiguous()


def gdn_conv_to_hf(c, w: Tensor) -> List[Tensor]:
    out = torch.empty_like(w)
    out[gdn_conv_perm(c)] = w
    return [out]


# ---------------------------------------------------------------------- attention layout
def _attn_dims(c):
    return c.num_attention_heads, c.num_query_groups, c.kv_channels


def qkv_to_ours(c, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """HF q (with gate), k, v -> per group [q | gate | k | v] (or [q | k | v] without gate)."""
    nh, ng, d = _attn_dims(c)
    tail = q.shape[1:]
    if c.attention_output_gate:
        q = q.reshape(nh, 2, d, *tail)  # per head [q | gate]
        qg = q.reshape(ng, nh // ng, 2, d, *tail).transpose(1, 2).reshape(ng, -1, *tail)
    else:
        qg = q.reshape(ng, -1, *tail)
    return torch.cat([qg, k.reshape(ng, d, *tail), v.reshape(ng, d, *tail)], dim=1).reshape(-1, *tail)


def qkv_to_hf(c, w: Tensor) -> List[Tensor]:
    nh, ng, d = _attn_dims(c)
    tail = w.shape[1:]
    per = nh // ng
    w = w.reshape(ng, -1, *tail)
    nq = (2 if c.attention_output_gate else 1) * per * d
    qg, k, v = w[:, :nq], w[:, nq : nq + d], w[:, nq + d :]
    if c.attention_output_gate:
        qg = qg.reshape(ng, 2, per, d, *tail).transpose(1, 2)  # -> [ng, per, 2, d]
    return [qg.reshape(-1, *tail).contiguous(), k.reshape(-1, *tail).contiguous(), v.reshape(-1, *tail).contiguous()]


def _fc1_to_ours(ts):
    return torch.cat([ts[0], ts[1]], dim=0)


def _fc1_to_hf(w):
    g, u = w.chunk(2, dim=0)
    return [g.contiguous(), u.contiguous()]


# ---------------------------------------------------------------------- the table
def weight_plan(config, expert_layout: str = "sequential") -> List[Entry]:
    """Concrete (ours <-> HF) entries for this config. `expert_layout`: 'sequential' (SequentialMLP)
    or 'te_grouped' (TEGroupedMLP's `linear_fc1.weight{e}`)."""
    c = config
    plan: List[Entry] = []

    def add(ours, hf, to_ours=_same, to_hf=_one):
        plan.append(Entry(ours, tuple(hf) if isinstance(hf, (list, tuple)) else (hf,), to_ours, to_hf))

    def add_mlp(ours_prefix, hf_prefix):
        add(f"{ours_prefix}.linear_fc1.weight", [f"{hf_prefix}.gate_proj.weight", f"{hf_prefix}.up_proj.weight"],
            _fc1_to_ours, _fc1_to_hf)
        add(f"{ours_prefix}.linear_fc2.weight", f"{hf_prefix}.down_proj.weight")

    def add_layer(o, h, kind, moe):
        add(f"{o}.input_layernorm.weight", f"{h}.input_layernorm.weight")
        add(f"{o}.pre_mlp_layernorm.weight", f"{h}.post_attention_layernorm.weight")
        sa = f"{o}.self_attention"
        if kind == "linear_attention":
            la = f"{h}.linear_attn"
            add(f"{sa}.in_proj.weight", [f"{la}.in_proj_qkvz.weight", f"{la}.in_proj_ba.weight"],
                lambda ts: gdn_in_proj_to_ours(c, *ts), lambda w: gdn_in_proj_to_hf(c, w))
            add(f"{sa}.conv1d.weight", f"{la}.conv1d.weight",
                lambda ts: gdn_conv_to_ours(c, ts[0]), lambda w: gdn_conv_to_hf(c, w))
            add(f"{sa}.A_log", f"{la}.A_log")
            add(f"{sa}.dt_bias", f"{la}.dt_bias")
            add(f"{sa}.out_norm.weight", f"{la}.norm.weight")
            add(f"{sa}.out_proj.weight", f"{la}.out_proj.weight")
        else:
            at = f"{h}.self_attn"
            add(f"{sa}.linear_qkv.weight", [f"{at}.q_proj.weight", f"{at}.k_proj.weight", f"{at}.v_proj.weight"],
                lambda ts: qkv_to_ours(c, *ts), lambda w: qkv_to_hf(c, w))
            if c.add_qkv_bias:
                add(f"{sa}.linear_qkv.bias", [f"{at}.q_proj.bias", f"{at}.k_proj.bias", f"{at}.v_proj.bias"],
                    lambda ts: qkv_to_ours(c, *ts), lambda w: qkv_to_hf(c, w))
            add(f"{sa}.q_layernorm.weight", f"{at}.q_norm.weight")
            add(f"{sa}.k_layernorm.weight", f"{at}.k_norm.weight")
            add(f"{sa}.linear_proj.weight", f"{at}.o_proj.weight")
        if moe:
            add(f"{o}.mlp.router.weight", f"{h}.mlp.gate.weight")
            for e in range(c.num_moe_experts):
                he = f"{h}.mlp.experts.{e}"
                if expert_layout == "te_grouped":
                    add(f"{o}.mlp.experts.linear_fc1.weight{e}", [f"{he}.gate_proj.weight", f"{he}.up_proj.weight"],
                        _fc1_to_ours, _fc1_to_hf)
                    add(f"{o}.mlp.experts.linear_fc2.weight{e}", f"{he}.down_proj.weight")
                else:
                    add_mlp(f"{o}.mlp.experts.local_experts.{e}", he)
            if c.moe_shared_expert_intermediate_size:
                add_mlp(f"{o}.mlp.shared_experts", f"{h}.mlp.shared_expert")
                if c.moe_shared_expert_gate:
                    add(f"{o}.mlp.shared_experts.gate_weight", f"{h}.mlp.shared_expert_gate.weight")
        else:
            add_mlp(f"{o}.mlp", f"{h}.mlp")

    add("embedding.word_embeddings.weight", "model.embed_tokens.weight")
    for i in range(c.num_layers):
        add_layer(f"decoder.layers.{i}", f"model.layers.{i}", c.layer_type(i), c.is_moe_layer(i))
    add("decoder.final_layernorm.weight", "model.norm.weight")
    if not c.tie_word_embeddings:
        add("output_layer.weight", "lm_head.weight")
    n_mtp = getattr(c, "mtp_num_layers", None) or 0
    if n_mtp > 1:
        raise ValueError(f"mtp_num_layers = {n_mtp}: HF Qwen3-Next holds one MTP layer (one mtp.fc / mtp.norm); "
                         f"use mtp_num_layers = 1 for a model that converts to and from HF")
    if n_mtp:  # megatron-core's MultiTokenPredictionLayer names (see modules/mtp.py)
        o = "mtp.layers.0"
        add(f"{o}.enorm.weight", "mtp.pre_fc_norm_embedding.weight")
        add(f"{o}.hnorm.weight", "mtp.pre_fc_norm_hidden.weight")
        add(f"{o}.eh_proj.weight", "mtp.fc.weight")
        add_layer(f"{o}.transformer_layer", "mtp.layers.0", "full_attention", bool(c.num_moe_experts))
        add(f"{o}.final_layernorm.weight", "mtp.norm.weight")
    return plan


MTP_PATTERN = re.compile(r"^mtp\.")


def skipped_hf_names(names: Iterable[str], config) -> List[str]:
    """HF tensors we knowingly do not map into the model: `mtp.*` when the config has no MTP block
    (``num_nextn_predict_layers`` absent or 0). With ``mtp_num_layers`` set they are mapped by the
    table (`weight_plan`) like every other tensor. The NeMo converter carries unmapped ones unchanged in
    `<nemo_dir>/extra/mtp.safetensors` and writes them back on export; `load_hf` ignores them."""
    if getattr(config, "mtp_num_layers", None):
        return []
    return sorted(n for n in names if MTP_PATTERN.match(n))


def hf_to_ours(hf_state, config, expert_layout: str = "sequential") -> dict:
    """Whole-dict conversion (small models, tests). `hf_state`: name -> tensor mapping."""
    return {e.ours: e.to_ours([hf_state[n] for n in e.hf]) for e in weight_plan(config, expert_layout)}


def ours_to_hf(state, config, expert_layout: str = "sequential") -> dict:
    """Whole-dict conversion back to HF names and layouts."""
    out = {}
    for e in weight_plan(config, expert_layout):
        out.update(zip(e.hf, e.to_hf(state[e.ours])))
    return out
