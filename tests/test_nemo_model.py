"""NeMo config / model glue: fields and validation come from the core, the spec resolves by name."""

import pytest
import torch

pytest.importorskip("nemo.collections.llm")


def _build(cfg):
    from nemo_qwen3_next import init_single_process

    init_single_process()
    return cfg.configure_model(None)


def test_config_is_gpt_config_with_core_fields_and_validation():
    from nemo.collections.llm import GPTConfig

    from nemo_qwen3_next import ConfigError, Qwen3NextConfig
    from nemo_qwen3_next.nemo import Qwen3NextNeMoConfig, qwen3_next_80b_a3b_nemo

    cfg = qwen3_next_80b_a3b_nemo()
    assert isinstance(cfg, GPTConfig) and isinstance(cfg, Qwen3NextConfig)
    assert (cfg.num_layers, cfg.num_moe_experts, cfg.moe_router_topk, cfg.vocab_size) == (48, 512, 10, 151936)
    assert cfg.layer_types[:4] == ["linear_attention"] * 3 + ["full_attention"]
    assert (cfg.rotary_percent, cfg.rotary_base, cfg.bf16) == (0.25, 10_000_000.0, True)
    assert cfg.share_embeddings_and_output_weights is False
    with pytest.raises(ConfigError, match="tensor_model_parallel_size"):
        Qwen3NextNeMoConfig(tensor_model_parallel_size=3)
    assert Qwen3NextNeMoConfig(tie_word_embeddings=True).share_embeddings_and_output_weights is True


def test_configure_model_uses_our_spec_rope_and_tied_embeddings():
    from nemo_qwen3_next.layer import Qwen3NextTransformerLayer
    from nemo_qwen3_next.modules import GatedDeltaNet, GatedSelfAttention
    from nemo_qwen3_next.nemo import qwen3_next_tiny_nemo

    cfg = qwen3_next_tiny_nemo(use_cpu_initialization=True, tie_word_embeddings=True)
    model = _build(cfg)
    layers = model.decoder.layers
    assert all(isinstance(l, Qwen3NextTransformerLayer) for l in layers)
    kinds = [type(l.self_attention) for l in layers]
    assert kinds == [GatedDeltaNet, GatedDeltaNet, GatedDeltaNet, GatedSelfAttention]
    assert model.rotary_pos_emb.inv_freq.numel() * 2 == int(cfg.kv_channels * 0.25)
    assert model.share_embeddings_and_output_weights
    assert "output_layer.weight" not in model.state_dict()
    assert model.embedding.word_embeddings.weight.shape[0] == cfg.vocab_size

    untied = _build(qwen3_next_tiny_nemo(use_cpu_initialization=True))
    assert "output_layer.weight" in untied.state_dict()


def test_spec_by_registered_name_or_callable():
    from nemo_qwen3_next import get_qwen3_next_block_spec
    from nemo_qwen3_next.nemo import qwen3_next_tiny_nemo

    by_name = _build(qwen3_next_tiny_nemo(use_cpu_initialization=True, transformer_layer_spec="megatron_qwen3_next"))
    by_fn = _build(qwen3_next_tiny_nemo(use_cpu_initialization=True,
                                        transformer_layer_spec=get_qwen3_next_block_spec))
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items() if torch.is_tensor(v)}  # noqa: E731
    assert shapes(by_name) == shapes(by_fn)
    with pytest.raises(KeyError, match="not registered"):
        _build(qwen3_next_tiny_nemo(use_cpu_initialization=True, transformer_layer_spec="no_such_spec"))


def test_model_is_llm_gpt_model_with_hf_connectors():
    from nemo.collections import llm

    from nemo_qwen3_next.nemo import HFQwen3NextExporter, HFQwen3NextImporter, Qwen3NextModel, qwen3_next_tiny_nemo

    model = Qwen3NextModel(qwen3_next_tiny_nemo())
    assert isinstance(model, llm.GPTModel)
    assert isinstance(model.importer("hf:///nonexistent"), HFQwen3NextImporter)
    assert isinstance(model.exporter("hf", "/nonexistent"), HFQwen3NextExporter)


def test_training_loss_reduction_matches_nemo_without_host_reads():
    """Our reduction gives NeMo's value (empty micro-batches left out) and never reads a device value
    on the host: NeMo's `if x[1] > 0` shows up as aten.is_nonzero / _local_scalar_dense."""
    from nemo.collections.llm.gpt.model.base import MaskedTokenLossReduction
    from torch.utils._python_dispatch import TorchDispatchMode

    from nemo_qwen3_next import init_single_process
    from nemo_qwen3_next.nemo import Qwen3NextModel, qwen3_next_tiny_nemo

    init_single_process()

    class HostReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.reads = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in ("is_nonzero", "_local_scalar_dense", "item"):
                self.reads.append(func.__name__)
            return func(*args, **(kwargs or {}))

    ours = Qwen3NextModel(qwen3_next_tiny_nemo(use_cpu_initialization=True)).training_loss_reduction
    g = torch.Generator().manual_seed(0)
    for rows in ([(3.5, 7), (0.0, 0), (float("nan"), 0), (1.25, 2)], [(2.0, 5)]):
        outs = [{"loss_sum_and_ub_size": torch.tensor([s, n], dtype=torch.float32)} for s, n in rows]
        for x in outs:
            x["loss_sum_and_ub_size"][0] += torch.rand((), generator=g) * (x["loss_sum_and_ub_size"][1] > 0)
        with HostReads() as mode:
            got = ours.reduce(outs)
        assert mode.reads == []
        want = MaskedTokenLossReduction().reduce(outs)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with HostReads() as mode:
        MaskedTokenLossReduction().reduce(outs)
    assert mode.reads, "the check must see NeMo's host read, or it proves nothing"
