"""`Qwen3NextConfig`: Megatron-Core's `TransformerConfig` plus every Qwen3-Next field.

Field names follow Megatron where Megatron has the concept (``num_query_groups``,
``kv_channels``, ``num_moe_experts`` ...) and Hugging Face where only Qwen3-Next has it
(``layer_types``, ``linear_num_key_heads`` ...). ``from_hf`` translates a transformers config;
``to_hf_dict`` goes back. Validation runs in ``__post_init__`` so a bad config fails before
anything is allocated, with one line that names the field and the fix.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from .checkpoint.errors import read_json_object
from .field_checks import MODEL_FIELD_KINDS as _FIELD_KINDS  # add a new field's kind there
from .field_checks import ConfigError, check_field

LINEAR = "linear_attention"
FULL = "full_attention"
_LAYER_TYPE_ALIASES = {"linear_attention": LINEAR, "linear": LINEAR, "full_attention": FULL, "full": FULL}


def normalize_layer_types(layer_types: List[str]) -> List[str]:
    """Map short aliases (`linear` / `full`) to HF names; reject anything else."""
    out = []
    for i, t in enumerate(layer_types):
        key = str(t).strip().lower()
        if key not in _LAYER_TYPE_ALIASES:
            raise ConfigError(
                f"layer_types[{i}] = {t!r} is not a known layer type; use one of "
                f"'linear_attention' ('linear') or 'full_attention' ('full')."
            )
        out.append(_LAYER_TYPE_ALIASES[key])
    return out


def layer_types_from_interval(num_layers: int, full_attention_interval: int) -> List[str]:
    """HF's default pattern: every `full_attention_interval`-th layer is full attention."""
    return [FULL if (i + 1) % full_attention_interval == 0 else LINEAR for i in range(num_layers)]


# transformers' `Qwen3NextConfig.__init__` defaults (4.57): what an absent config.json field means.
HF_DEFAULTS = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=48, num_attention_heads=16,
    num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768, initializer_range=0.02,
    rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=None, partial_rotary_factor=0.25,
    attention_bias=False, attention_dropout=0.0, head_dim=256, linear_conv_kernel_dim=4, linear_key_head_dim=128,
    linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32, decoder_sparse_step=1,
    moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts_per_tok=10, num_experts=512,
    norm_topk_prob=True, router_aux_loss_coef=0.001, mlp_only_layers=[], layer_types=None, full_attention_interval=4,
    num_nextn_predict_layers=0,  # not a transformers field: Qwen3-Next checkpoints write it (MTP layers)
)
# HF names checked before translation, so the error names the config.json field.
_HF_FIELD_KINDS = {
    "vocab_size": "pos", "hidden_size": "pos", "intermediate_size": "pos", "num_hidden_layers": "pos",
    "num_attention_heads": "pos", "num_key_value_heads": "pos", "max_position_embeddings": "pos",
    "head_dim": "pos", "linear_conv_kernel_dim": "pos", "linear_key_head_dim": "pos", "linear_value_head_dim": "pos",
    "linear_num_key_heads": "pos", "linear_num_value_heads": "pos", "decoder_sparse_step": "pos",
    "full_attention_interval": "pos", "num_experts": "nonneg", "moe_intermediate_size": "nonneg",
    "shared_expert_intermediate_size": "nonneg", "num_experts_per_tok": "nonneg", "initializer_range": "nonnegf",
    "rms_norm_eps": "posf", "rope_theta": "posf", "partial_rotary_factor": "posf", "attention_dropout": "prob",
    "router_aux_loss_coef": "nonnegf", "tie_word_embeddings": "bool", "attention_bias": "bool", "norm_topk_prob": "bool",
}


# HF config.json name -> our field, where the value carries over as it is (numbers as floats where
# the kind is a float); MoE fields depend on num_experts and are set in `from_hf`.
_HF_SAME_VALUE = {
    "hidden_size": "hidden_size", "intermediate_size": "ffn_hidden_size", "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_query_groups", "head_dim": "kv_channels", "rms_norm_eps": "layernorm_epsilon",
    "vocab_size": "vocab_size", "max_position_embeddings": "max_position_embeddings", "rope_theta": "rotary_base",
    "partial_rotary_factor": "rotary_percent", "tie_word_embeddings": "tie_word_embeddings",
    "attention_bias": "add_qkv_bias", "attention_dropout": "attention_dropout",
    "linear_num_key_heads": "linear_num_key_heads", "linear_num_value_heads": "linear_num_value_heads",
    "linear_key_head_dim": "linear_key_head_dim", "linear_value_head_dim": "linear_value_head_dim",
    "linear_conv_kernel_dim": "linear_conv_kernel_dim", "decoder_sparse_step": "decoder_sparse_step",
    "norm_topk_prob": "moe_norm_topk_prob", "initializer_range": "init_method_std",
}


@dataclass
class Qwen3NextConfig(TransformerConfig):
    """Megatron `TransformerConfig` for Qwen3-Next (hybrid Gated DeltaNet + gated attention + MoE).

    Defaults are Qwen3-Next-80B-A3B's; use a preset (`qwen3_next_80b_a3b`, `qwen3_next_tiny_*`)
    or `from_hf` rather than spelling every field.
    """

    # --- model-level fields GPTModel takes as arguments; carried here so one object says it all
    vocab_size: int = 151936
    max_position_embeddings: int = 262144
    rotary_base: float = 10_000_000.0
    rotary_percent: float = 0.25  # HF partial_rotary_factor: RoPE on the first 25% of head_dim
    tie_word_embeddings: bool = False

    # --- hybrid layout
    layer_types: Optional[List[str]] = None  # HF names or aliases; None -> from the interval
    full_attention_interval: int = 4

    # --- Gated DeltaNet (linear attention)
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    linear_attention_chunk_size: int = 64
    linear_attention_use_recurrent: bool = False  # recurrent kernel instead of the chunked one
    linear_attention_backend: str = "auto"  # auto: fla on CUDA, torch reference on CPU

    # --- gated full attention
    attention_output_gate: bool = True

    # --- speed (same math; see docs/performance.md)
    # LM head + cross-entropy as one chunked op when labels are given: no fp32 logits for the batch.
    fused_linear_cross_entropy: bool = True
    # MoE token permutation from the top-k indices (sort-free, no host sync) instead of megatron's
    # routing-map permute; used where the dispatcher needs no cross-rank exchange (TP*EP == 1).
    moe_fast_permute: bool = True
    # --- activation memory: recompute each GDN layer's conv + delta rule + gated norm in backward
    # (with Megatron's recompute_granularity="selective", recompute_modules=["core_attn", "moe", ...])
    linear_attention_recompute: bool = False
    # --- launch overhead: replay each GDN / gated-attention mixer's forward and backward as CUDA
    # graphs in training (fixed shapes, one GPU per TP group; see modules/cuda_graphs.py)
    mixer_cuda_graphs: bool = False
    # --- launch overhead: each MoE layer's routed experts as two stacked Parameters [E_local, ...] (one
    # per projection) instead of 2*E_local; state dicts and checkpoints keep the per-expert layout
    # (see modules/grouped_experts.py)
    moe_stacked_experts: bool = False

    # --- multi-token prediction (HF num_nextn_predict_layers; see modules/mtp.py). mtp_num_layers
    # (TransformerConfig's field, default None = no MTP block) turns it on; the MTP loss is added with
    # this weight (Megatron-LM's default 0.1; divided by mtp_num_layers).
    mtp_loss_scaling_factor: Optional[float] = 0.1

    # --- MoE (HF: decoder_sparse_step, mlp_only_layers, norm_topk_prob, shared_expert_gate)
    decoder_sparse_step: int = 1
    mlp_only_layers: List[int] = field(default_factory=list)  # 0-based layers with a dense MLP
    moe_shared_expert_gate: bool = True
    moe_norm_topk_prob: bool = True

    # --- Megatron defaults that Qwen3-Next fixes
    num_layers: int = 48
    hidden_size: int = 2048
    num_attention_heads: int = 16
    num_query_groups: Optional[int] = 2
    kv_channels: Optional[int] = 256
    ffn_hidden_size: Optional[int] = 5120
    normalization: str = "RMSNorm"
    layernorm_zero_centered_gamma: bool = True
    layernorm_epsilon: float = 1e-6
    qk_layernorm: bool = True
    gated_linear_unit: bool = True
    activation_func: Any = F.silu
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    position_embedding_type: str = "rope"
    apply_rope_fusion: bool = False
    bias_activation_fusion: bool = False
    masked_softmax_fusion: bool = False
    persist_layer_norm: bool = False
    bias_dropout_fusion: bool = False
    num_moe_experts: Optional[int] = 512
    moe_router_topk: int = 10
    moe_ffn_hidden_size: Optional[int] = 512
    moe_shared_expert_intermediate_size: Optional[int] = 512
    moe_router_score_function: str = "softmax"
    moe_router_load_balancing_type: Union[str, List[str]] = "global_aux_loss"
    moe_aux_loss_coeff: Union[float, List[float]] = 1e-3
    moe_router_dtype: Optional[str] = "fp32"
    moe_token_dispatcher_type: str = "allgather"
    moe_grouped_gemm: bool = False

    def __post_init__(self):
        self._validate_and_derive()
        super().__post_init__()

    # ------------------------------------------------------------------ validation
    def _check_fields(self):
        for name, kind in _FIELD_KINDS.items():
            check_field(name, getattr(self, name), kind)
        if self.layer_types is not None and not isinstance(self.layer_types, (list, tuple)):
            raise ConfigError(f"layer_types = {self.layer_types!r} must be a list with one entry per layer "
                              f"('linear_attention' / 'full_attention').")
        if not isinstance(self.mlp_only_layers, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.mlp_only_layers):
            raise ConfigError(f"mlp_only_layers = {self.mlp_only_layers!r} must be a list of 0-based layer indices.")
        coeffs = self.moe_aux_loss_coeff if isinstance(self.moe_aux_loss_coeff, (list, tuple)) else [
            self.moe_aux_loss_coeff]
        for c in coeffs:
            check_field("moe_aux_loss_coeff", c, "nonnegf")
        check_field("mtp_num_layers", self.mtp_num_layers, "pos?")
        if self.mtp_num_layers:
            check_field("mtp_loss_scaling_factor", self.mtp_loss_scaling_factor, "nonnegf")

    def _validate_and_derive(self):
        self._check_fields()
        if self.layer_types is None:
            if self.full_attention_interval < 1:
                raise ConfigError(
                    f"full_attention_interval = {self.full_attention_interval} must be >= 1."
                )
            self.layer_types = layer_types_from_interval(self.num_layers, self.full_attention_interval)
        else:
            self.layer_types = normalize_layer_types(list(self.layer_types))
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_layers = {self.num_layers}; "
                f"give one entry per layer (or set num_layers = {len(self.layer_types)})."
            )
        tp = self.tensor_model_parallel_size
        if self.linear_num_value_heads % self.linear_num_key_heads != 0:
            raise ConfigError(
                f"linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                f"linear_num_key_heads ({self.linear_num_key_heads}): value heads are grouped under key heads."
            )
        if LINEAR in self.layer_types and self.linear_num_key_heads % tp != 0:
            raise ConfigError(
                f"linear_num_key_heads ({self.linear_num_key_heads}) is not divisible by "
                f"tensor_model_parallel_size ({tp}); choose a TP size that divides it."
            )
        if self.num_attention_heads % tp != 0:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) is not divisible by "
                f"tensor_model_parallel_size ({tp}); choose a TP size that divides it."
            )
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups != 0:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_query_groups ({groups})."
            )
        if FULL in self.layer_types and groups % tp != 0:
            raise ConfigError(
                f"num_query_groups ({groups}) is not divisible by tensor_model_parallel_size ({tp}); "
                f"choose a TP size that divides it."
            )
        if not (0.0 < float(self.rotary_percent) <= 1.0):
            raise ConfigError(f"rotary_percent = {self.rotary_percent} must be in (0, 1].")
        head_dim = self.kv_channels or self.hidden_size // self.num_attention_heads
        rotary_dim = int(head_dim * float(self.rotary_percent))
        if FULL in self.layer_types and (rotary_dim < 2 or rotary_dim % 2):
            raise ConfigError(f"rotary_percent ({self.rotary_percent}) x head dim ({head_dim}) = {rotary_dim} RoPE "
                              f"channels; it must be an even number >= 2: change rotary_percent or kv_channels.")
        if self.linear_attention_chunk_size < 1:
            raise ConfigError(f"linear_attention_chunk_size = {self.linear_attention_chunk_size} must be >= 1.")
        if self.linear_attention_backend not in ("auto", "torch", "fla"):
            raise ConfigError(
                f"linear_attention_backend = {self.linear_attention_backend!r}; use 'auto', 'torch' or 'fla'."
            )
        if self.num_moe_experts:
            if self.moe_router_topk > self.num_moe_experts:
                raise ConfigError(
                    f"moe_router_topk ({self.moe_router_topk}) > num_moe_experts ({self.num_moe_experts}); "
                    f"lower the top-k or add experts."
                )
            for i in self.mlp_only_layers:
                if not 0 <= i < self.num_layers:
                    raise ConfigError(f"mlp_only_layers contains {i}, outside [0, {self.num_layers}).")
            # Megatron's own per-layer MoE pattern (used by its FLOP and aux-loss bookkeeping).
            self.moe_layer_freq = [int(self.is_moe_layer(i)) for i in range(self.num_layers)]
            # HF norm_topk_prob=True == softmax over the chosen logits (Megatron's default);
            # False == softmax over all experts, then top-k without renormalisation.
            self.moe_router_pre_softmax = not self.moe_norm_topk_prob
        else:
            self.mlp_only_layers = list(range(self.num_layers))

    # ------------------------------------------------------------------ per-layer queries
    def layer_type(self, layer_index: int) -> str:
        """HF layer type of global, 0-based `layer_index`."""
        return self.layer_types[layer_index]

    def is_moe_layer(self, layer_index: int) -> bool:
        """HF rule: sparse unless listed in mlp_only_layers or off the decoder_sparse_step."""
        return bool(
            self.num_moe_experts
            and layer_index not in self.mlp_only_layers
            and (layer_index + 1) % self.decoder_sparse_step == 0
        )

    # ------------------------------------------------------------------ HF round trip
    @classmethod
    def from_hf(cls, hf_config: Union[str, os.PathLike, Dict[str, Any], Any], **overrides) -> "Qwen3NextConfig":
        """Build from a transformers `Qwen3NextConfig`, a dict, a `config.json` or its directory.

        Absent fields take transformers' own defaults (`HF_DEFAULTS`, e.g. head_dim 256, 512 experts),
        so a hand-written config.json means here what it means to transformers."""
        where = ""
        if isinstance(hf_config, (str, os.PathLike)):
            path = os.fspath(hf_config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            where = f"{path}: "
            hf = read_json_object(path, "give a Hugging Face config.json (or its directory)", ConfigError)
        elif isinstance(hf_config, dict):
            hf = dict(hf_config)
        else:
            hf = hf_config.to_dict()
        if hf.get("model_type", "qwen3_next") != "qwen3_next":
            raise ConfigError(f"{where}model_type = {hf['model_type']!r}: this is not a Qwen3-Next config "
                              f"(expected 'qwen3_next'); use a Qwen3-Next checkpoint.")
        hf = {**HF_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
        for name, kind in _HF_FIELD_KINDS.items():
            check_field(name, hf[name], kind, where)
        num_layers = hf["num_hidden_layers"]
        layer_types = hf.get("layer_types") or layer_types_from_interval(num_layers, hf["full_attention_interval"])
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{where}hidden_act = {hf['hidden_act']!r}: only 'silu' is supported.")
        if hf.get("rope_scaling"):
            raise ConfigError(f"{where}rope_scaling is set in config.json; only plain RoPE is supported.")
        num_experts = hf["num_experts"] or None
        kw = {ours: float(hf[name]) if _HF_FIELD_KINDS[name] in ("posf", "nonnegf", "prob") else hf[name]
              for name, ours in _HF_SAME_VALUE.items()}
        kw.update(
            num_layers=num_layers,
            add_bias_linear=False,
            layer_types=list(layer_types),
            mlp_only_layers=list(hf["mlp_only_layers"]),
            num_moe_experts=num_experts,
            moe_router_topk=hf["num_experts_per_tok"] if num_experts else 2,
            moe_ffn_hidden_size=hf["moe_intermediate_size"] if num_experts else None,
            moe_shared_expert_intermediate_size=(hf["shared_expert_intermediate_size"] or None)
            if num_experts
            else None,
            moe_aux_loss_coeff=float(hf["router_aux_loss_coef"]) if num_experts else 0.0,
        )
        if hf["num_nextn_predict_layers"] > 1:
            raise ConfigError(f"{where}num_nextn_predict_layers = {hf['num_nextn_predict_layers']}: Qwen3-Next has one "
                              f"MTP layer (mtp.fc, mtp.layers.0, mtp.norm); use 0 or 1.")
        kw["mtp_num_layers"] = hf["num_nextn_predict_layers"] or None  # the MTP block, `mtp.*` tensors mapped
        kw.update(overrides)
        if not where:
            return cls(**kw)
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{where}{e}") from None

    def to_hf_dict(self) -> Dict[str, Any]:
        """The transformers `config.json` fields of this architecture (model_type qwen3_next)."""
        moe = bool(self.num_moe_experts)
        return {
            "architectures": ["Qwen3NextForCausalLM"],
            "model_type": "qwen3_next",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_query_groups,
            "head_dim": self.kv_channels,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.init_method_std,
            "rms_norm_eps": self.layernorm_epsilon,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rotary_base,
            "partial_rotary_factor": self.rotary_percent,
            "attention_bias": self.add_qkv_bias,
            "attention_dropout": self.attention_dropout,
            "layer_types": list(self.layer_types),
            "full_attention_interval": self.full_attention_interval,
            "linear_conv_kernel_dim": self.linear_conv_kernel_dim,
            "linear_key_head_dim": self.linear_key_head_dim,
            "linear_value_head_dim": self.linear_value_head_dim,
            "linear_num_key_heads": self.linear_num_key_heads,
            "linear_num_value_heads": self.linear_num_value_heads,
            "decoder_sparse_step": self.decoder_sparse_step,
            "moe_intermediate_size": self.moe_ffn_hidden_size if moe else 0,
            "shared_expert_intermediate_size": (self.moe_shared_expert_intermediate_size or 0) if moe else 0,
            "num_experts_per_tok": self.moe_router_topk if moe else 0,
            "num_experts": self.num_moe_experts or 0,
            "norm_topk_prob": self.moe_norm_topk_prob,
            "router_aux_loss_coef": self.moe_aux_loss_coeff if moe else 0.0,
            "mlp_only_layers": [i for i in self.mlp_only_layers] if moe else [],
            **({"num_nextn_predict_layers": self.mtp_num_layers} if self.mtp_num_layers else {}),
        }

    def replace(self, **changes) -> "Qwen3NextConfig":
        """A copy with `changes` applied and validated again."""
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------- presets
def qwen3_next_80b_a3b(**overrides) -> Qwen3NextConfig:
    """Qwen3-Next-80B-A3B as published (48 layers, 3:1 GDN:attention, 512 experts top-10)."""
    import torch

    kw = dict(bf16=True, params_dtype=torch.bfloat16)
    kw.update(overrides)
    return Qwen3NextConfig(**kw)


def _tiny(hidden, layers, heads, groups, head_dim, lk, lv, dk, dv, experts, topk, moe_ffn, ffn, vocab, **overrides):
    kw = dict(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim,
        ffn_hidden_size=ffn,
        linear_num_key_heads=lk,
        linear_num_value_heads=lv,
        linear_key_head_dim=dk,
        linear_value_head_dim=dv,
        num_moe_experts=experts,
        moe_router_topk=topk,
        moe_ffn_hidden_size=moe_ffn,
        moe_shared_expert_intermediate_size=moe_ffn,
        vocab_size=vocab,
        max_position_embeddings=4096,
        rotary_base=10000.0,
        rotary_percent=0.25,
        linear_attention_chunk_size=64,
    )
    kw.update(overrides)
    return Qwen3NextConfig(**kw)


def qwen3_next_tiny_5m(**overrides) -> Qwen3NextConfig:
    """~5M parameters (byte-level vocab): trains on one CPU core in minutes."""
    return _tiny(192, 4, 4, 2, 48, 2, 4, 48, 48, 8, 2, 192, 576, 512, **overrides)


def qwen3_next_tiny_10m(**overrides) -> Qwen3NextConfig:
    """~10M parameters."""
    return _tiny(192, 8, 4, 2, 48, 2, 4, 48, 48, 8, 2, 192, 576, 512, **overrides)


def qwen3_next_tiny_50m(**overrides) -> Qwen3NextConfig:
    """~50M parameters."""
    return _tiny(384, 8, 8, 2, 64, 4, 8, 64, 64, 16, 4, 256, 1024, 512, **overrides)


PRESETS = {
    "qwen3_next_80b_a3b": qwen3_next_80b_a3b,
    "qwen3_next_tiny_5m": qwen3_next_tiny_5m,
    "qwen3_next_tiny_10m": qwen3_next_tiny_10m,
    "qwen3_next_tiny_50m": qwen3_next_tiny_50m,
}
