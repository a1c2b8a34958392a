"""Tiny random Hugging Face Qwen3-Next models, for tests, examples and quick checks.

Kept in the package (not under tests/) because torchrun worker scripts, conversion tests and
benchmarks build the same models. Needs `transformers` (the `test` extra).
"""

from __future__ import annotations

import torch

TINY_HF = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=24,
    linear_conv_kernel_dim=4,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=48,
    shared_expert_intermediate_size=40,
    mlp_only_layers=[1],
    partial_rotary_factor=0.25,
    max_position_embeddings=512,
    rope_theta=10000.0,
    layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
    tie_word_embeddings=False,
)


def tiny_hf_config(**overrides):
    """A transformers `Qwen3NextConfig` with both layer kinds, MoE + gated shared expert, a dense layer."""
    from transformers import Qwen3NextConfig

    kw = dict(TINY_HF)
    kw.update(overrides)
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        kw.pop("layer_types")
    return Qwen3NextConfig(**kw)


def random_hf_model(config=None, seed: int = 0, dtype=torch.float32):
    """A randomly initialised `Qwen3NextForCausalLM`; norm gains are perturbed so that the
    zero-centred (1 + w) and plain-weight conventions are actually exercised.

    `A_log` and `dt_bias` are drawn from U(-1, 1) instead of HF's init (A up to 16): with such
    strong decays the A_log gradient is dominated by fp32 cancellation (our own fp32 and fp64
    runs differed by 2.4e-4 relative), which would hide real errors behind noise."""
    from transformers import Qwen3NextForCausalLM

    config = config or tiny_hf_config()
    torch.manual_seed(seed)
    model = Qwen3NextForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith(("A_log", "dt_bias")):
                p.uniform_(-1.0, 1.0)
    return model


def random_mtp_layer(config=None, seed: int = 0, dtype=torch.float32):
    """A random HF `Qwen3NextDecoderLayer` shaped as the MTP layer (gated full attention + sparse MoE),
    norm gains perturbed like `random_hf_model`'s. Its state dict, prefixed ``mtp.layers.0.``, is the
    layer part of a checkpoint's ``mtp.*`` tensors; tests use the module itself as the reference."""
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextDecoderLayer

    config = config or tiny_hf_config()
    # the HF layer class picks its kind from layer_types / mlp_only_layers at layer_idx: ask for index 0
    cfg = type(config)(**{**config.to_dict(), "num_hidden_layers": 1, "layer_types": ["full_attention"],
                          "mlp_only_layers": [], "decoder_sparse_step": 1})
    cfg._attn_implementation = "eager"  # a bare config names no attention kernel
    torch.manual_seed(seed)
    layer = Qwen3NextDecoderLayer(cfg, 0).to(dtype).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.normal_(0.0, 0.05) if "norm" not in name else p.add_(0.1 * torch.randn_like(p))
    return layer


def random_mtp_tensors(config=None, seed: int = 0, dtype=torch.float32):
    """Every ``mtp.*`` tensor of a Qwen3-Next checkpoint with ``num_nextn_predict_layers: 1``, random:
    ``pre_fc_norm_embedding``, ``pre_fc_norm_hidden``, ``fc`` [H, 2H], ``layers.0.*``, ``norm``."""
    config = config or tiny_hf_config()
    h = config.hidden_size
    g = torch.Generator().manual_seed(seed + 1)
    out = {f"mtp.layers.0.{k}": v.detach().clone() for k, v in random_mtp_layer(config, seed, dtype).state_dict().items()}
    out["mtp.fc.weight"] = (torch.randn(h, 2 * h, generator=g) / (2 * h) ** 0.5).to(dtype)
    for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        out[f"mtp.{n}.weight"] = (0.1 * torch.randn(h, generator=g)).to(dtype)
    return out


def save_hf_with_mtp(path, config=None, seed: int = 0):
    """A HF directory as Qwen3-Next ships one: `random_hf_model` saved, its `mtp.*` tensors
    (`random_mtp_tensors`) in a second file, an index, config.json with ``num_nextn_predict_layers: 1``.
    Returns (the HF model, the mtp tensors)."""
    import json
    import os

    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = config or tiny_hf_config()
    hf = random_hf_model(cfg, seed=seed)
    hf.save_pretrained(path)
    mtp = random_mtp_tensors(cfg, seed=seed)
    save_file(mtp, os.path.join(path, "model-mtp.safetensors"), metadata={"format": "pt"})
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        weight_map = {k: "model.safetensors" for k in f.keys()}
    weight_map.update({k: "model-mtp.safetensors" for k in mtp})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    c["num_nextn_predict_layers"] = 1
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    return hf, mtp
