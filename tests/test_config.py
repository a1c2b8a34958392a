"""Config validation, HF round trip, presets, spec registry and per-layer selection."""

import json

import pytest
import torch
from megatron.core.transformer.moe.moe_layer import MoELayer

from nemo_qwen3_next import (
    PRESETS,
    ConfigError,
    Qwen3NextConfig,
    build_model,
    get_qwen3_next_block_spec,
    init_single_process,
    resolve_spec,
)
from nemo_qwen3_next.config import FULL, LINEAR
from nemo_qwen3_next.modules import GatedDeltaNet, GatedSelfAttention
from nemo_qwen3_next.testing import tiny_hf_config

TINY = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
            ffn_hidden_size=96, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
            linear_value_head_dim=16, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
            moe_shared_expert_intermediate_size=32, vocab_size=128)


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(layer_types=["linear"] * 3), "layer_types"),
        (dict(layer_types=["linear", "full", "mamba", "full"]), "layer_types[2]"),
        (dict(linear_num_value_heads=5), "linear_num_value_heads"),
        (dict(tensor_model_parallel_size=4, linear_num_key_heads=2, linear_num_value_heads=4), "linear_num_key_heads"),
        (dict(tensor_model_parallel_size=3, layer_types=["full"] * 4), "num_attention_heads"),
        (dict(tensor_model_parallel_size=4, num_attention_heads=8, linear_num_key_heads=4,
              linear_num_value_heads=8), "num_query_groups"),
        (dict(rotary_percent=0.0), "rotary_percent"),
        (dict(rotary_percent=1.5), "rotary_percent"),
        (dict(moe_router_topk=5), "moe_router_topk"),
        (dict(linear_attention_backend="cuda"), "linear_attention_backend"),
    ],
)
def test_bad_config_one_line_error_naming_field(changes, field):
    with pytest.raises(ConfigError) as e:
        Qwen3NextConfig(**{**TINY, **changes})
    msg = str(e.value)
    assert field in msg and "\n" not in msg, msg


def test_layer_types_aliases_and_interval():
    c = Qwen3NextConfig(**{**TINY, "layer_types": ["linear", "FULL", "linear_attention", "full_attention"]})
    assert c.layer_types == [LINEAR, FULL, LINEAR, FULL]
    c = Qwen3NextConfig(**{**TINY, "num_layers": 8, "full_attention_interval": 4})
    assert c.layer_types == [LINEAR, LINEAR, LINEAR, FULL] * 2


def test_from_hf_matches_transformers_config_and_round_trips(tmp_path):
    hf = tiny_hf_config(num_key_value_heads=1, mlp_only_layers=[0, 2])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf.to_dict()))
    for src in (hf, str(path), str(tmp_path)):
        c = Qwen3NextConfig.from_hf(src)
        assert c.layer_types == hf.layer_types
        assert (c.num_query_groups, c.kv_channels, c.rotary_percent) == (1, hf.head_dim, hf.partial_rotary_factor)
        assert [c.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    back = Qwen3NextConfig.from_hf(hf).to_hf_dict()
    for key, value in back.items():
        if key in hf.to_dict() and key not in ("architectures", "full_attention_interval"):
            assert hf.to_dict()[key] == value, key


def test_80b_preset_fields():
    c = PRESETS["qwen3_next_80b_a3b"]()
    assert (c.num_layers, c.hidden_size, c.num_moe_experts, c.moe_router_topk) == (48, 2048, 512, 10)
    assert c.layer_types.count(FULL) == 12 and c.layer_types[3] == FULL
    assert (c.linear_num_key_heads, c.linear_num_value_heads, c.kv_channels, c.rotary_percent) == (16, 32, 256, 0.25)


@pytest.mark.parametrize("name, millions", [("qwen3_next_tiny_5m", 5), ("qwen3_next_tiny_10m", 10),
                                            ("qwen3_next_tiny_50m", 50)])
def test_tiny_presets_size(name, millions):
    init_single_process()
    model = build_model(PRESETS[name](use_cpu_initialization=True), backend="local")
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert 0.7 * millions <= n <= 1.3 * millions, n


def test_registry_and_layer_selection():
    init_single_process()
    assert resolve_spec("megatron_qwen3_next") is get_qwen3_next_block_spec
    with pytest.raises(KeyError, match="megatron_qwen3_nex"):
        resolve_spec("megatron_qwen3_nex")
    config = Qwen3NextConfig(**{**TINY, "layer_types": ["full", "linear", "linear", "full"], "mlp_only_layers": [2],
                                "use_cpu_initialization": True})
    model = build_model(config, backend="local")
    layers = model.decoder.layers
    kinds = [type(layer.self_attention) for layer in layers]
    assert kinds == [GatedSelfAttention, GatedDeltaNet, GatedDeltaNet, GatedSelfAttention]
    assert [type(layer.mlp).__name__ for layer in layers] == ["Qwen3NextMoELayer"] * 2 + ["MLP", "Qwen3NextMoELayer"]
    assert isinstance(layers[0].mlp, MoELayer)  # Megatron's MoE layer, with the top-k permutation swapped in
    assert layers[0].mlp.shared_experts.use_shared_expert_gate


def test_layer_picks_type_by_global_index_under_pipeline_offset(monkeypatch):
    """A pipeline stage starting at global layer 2 builds layer_types[2:], not [0:]."""
    import nemo_qwen3_next.layer as layer_mod
    from megatron.core.transformer.spec_utils import build_module

    init_single_process()
    config = Qwen3NextConfig(**{**TINY, "layer_types": ["full", "full", "linear", "full"],
                                "use_cpu_initialization": True})
    monkeypatch.setattr(layer_mod, "get_transformer_layer_offset", lambda *a, **k: 2)
    spec = get_qwen3_next_block_spec(config, backend="local").layer_specs[0]
    first = build_module(spec, config=config, layer_number=1)
    second = build_module(spec, config=config, layer_number=2)
    assert (first.layer_index, first.layer_type) == (2, LINEAR) and isinstance(first.self_attention, GatedDeltaNet)
    assert second.layer_type == FULL and isinstance(second.self_attention, GatedSelfAttention)


def test_no_cuda_call_in_constructors():
    """Building (and running) the model on a CPU machine must not touch CUDA."""
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    init_single_process()
    model = build_model(Qwen3NextConfig(**{**TINY, "use_cpu_initialization": True}), backend="local")
    ids = torch.randint(0, 128, (1, 9))
    out = model(ids, torch.arange(9)[None], None)
    assert out.shape == (1, 9, 128) and torch.isfinite(out).all()
