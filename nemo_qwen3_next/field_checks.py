"""`ConfigError` and `check_field`: the one-line field checks shared by the model config and the
pretraining config; also the generation settings' checks (`check_sampling`, `check_speculative`). Stdlib only, so the CLIs check values before megatron-core (~3 s) is imported."""

from __future__ import annotations

from typing import Any, Optional


class ConfigError(ValueError):
    """A Qwen3-Next config field has a bad value; the message names the field and the fix."""


# "pos" int >= 1, "nonneg" int >= 0, "pos?"/"nonneg?" also None, "posf" number > 0,
# "nonnegf" number >= 0, "prob" number in [0, 1), "bool".
_KIND_TEXT = {"pos": "an integer >= 1", "nonneg": "an integer >= 0", "posf": "a number > 0",
              "nonnegf": "a number >= 0", "prob": "a number in [0, 1)", "bool": "true or false"}


# `Qwen3NextConfig` field -> kind, checked first in its __post_init__ (and by the pretrain CLI before
# megatron-core is imported), so a wrong type or sign is named rather than failing inside Megatron.
MODEL_FIELD_KINDS = {
    "num_layers": "pos", "hidden_size": "pos", "num_attention_heads": "pos", "vocab_size": "pos",
    "max_position_embeddings": "pos", "full_attention_interval": "pos", "linear_num_key_heads": "pos",
    "linear_num_value_heads": "pos", "linear_key_head_dim": "pos", "linear_value_head_dim": "pos",
    "linear_conv_kernel_dim": "pos", "linear_attention_chunk_size": "pos", "decoder_sparse_step": "pos",
    "moe_router_topk": "pos", "tensor_model_parallel_size": "pos", "pipeline_model_parallel_size": "pos",
    "expert_model_parallel_size": "pos", "context_parallel_size": "pos",
    "num_query_groups": "pos?", "kv_channels": "pos?", "ffn_hidden_size": "pos?", "num_moe_experts": "nonneg?",
    "moe_ffn_hidden_size": "pos?", "moe_shared_expert_intermediate_size": "pos?",
    "layernorm_epsilon": "posf", "rotary_base": "posf", "rotary_percent": "posf", "init_method_std": "nonnegf",
    "hidden_dropout": "prob", "attention_dropout": "prob",
    "tie_word_embeddings": "bool", "attention_output_gate": "bool", "linear_attention_use_recurrent": "bool",
    "qk_layernorm": "bool", "moe_shared_expert_gate": "bool", "moe_norm_topk_prob": "bool",
    "fused_linear_cross_entropy": "bool", "moe_fast_permute": "bool", "add_qkv_bias": "bool",
    "mixer_cuda_graphs": "bool", "moe_stacked_experts": "bool",
}


def check_field(name: str, value: Any, kind: str, where: str = "") -> None:
    """One line naming the field if `value` is not of `kind` (see `_KIND_TEXT`); bools are not numbers."""
    base = kind.rstrip("?")
    if value is None and kind.endswith("?"):
        return
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_num = is_int or isinstance(value, float)
    ok = {"pos": is_int and value >= 1, "nonneg": is_int and value >= 0,
          "posf": is_num and value > 0 and value == value and value != float("inf"),
          "nonnegf": is_num and value >= 0 and value != float("inf"),
          "prob": is_num and 0 <= value < 1, "bool": isinstance(value, bool)}[base]
    if not ok:
        what = _KIND_TEXT[base] + (" or null" if kind.endswith("?") else "")
        raise ConfigError(f"{where}{name} = {value!r} ({type(value).__name__}) must be {what}; fix {name}.")


# --- generation settings (examples/generate.py checks them before torch is imported)
def check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """One-line errors for settings outside their definitions."""
    if temperature < 0:
        raise ValueError(f"temperature = {temperature}: use 0 (greedy) or a positive value")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k = {top_k}: use a positive integer or None")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p = {top_p}: must lie in (0, 1]")


def check_speculative(k, temperature: float, batch: int) -> None:
    """One-line errors for speculation settings this implementation does not cover."""
    if int(k) != k or k < 1:
        raise ValueError(f"speculative_k = {k}: use a positive integer (tokens drafted per round) or None")
    if temperature != 0:
        raise ValueError(f"speculative decoding is greedy only: temperature = {temperature}, use 0 or "
                         "speculative_k=None")
    if batch != 1:
        raise ValueError(f"speculative decoding supports batch 1: got {batch} prompts; generate them one by one "
                         "or use speculative_k=None")
