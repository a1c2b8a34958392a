"""`GroupedSequentialMLP` with QWEN3_NEXT_MOE_EXPERTS=grouped_mm: the same model as the expert loop.

References: HF transformers' `Qwen3NextForCausalLM` (logits, loss and every gradient, through the
same `load_hf` path as tests/test_parity.py) and megatron-core's own `SequentialMLP` loop on the same
module (an expert that receives no token included). fp32 on CPU, where `torch._grouped_mm` runs too.
"""

import pytest
import torch
import torch.nn.functional as F

from nemo_qwen3_next import load_hf
from nemo_qwen3_next.hf_mapping import ours_to_hf
from nemo_qwen3_next.modules.grouped_experts import GroupedSequentialMLP
from nemo_qwen3_next.testing import random_hf_model, tiny_hf_config

pytestmark = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="needs torch._grouped_mm")
# Whole-model CPU references: with a GPU present megatron-core puts router tensors on the current CUDA
# device, so these run where CI runs (CPU); on a GPU, test_gpu_auto_grouped_equals_the_loop_in_bf16.
cpu_model = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU whole-model reference (see above)")


@pytest.fixture
def grouped(monkeypatch):
    monkeypatch.setenv("QWEN3_NEXT_MOE_EXPERTS", "grouped_mm")


def _experts(model):
    mods = [m for m in model.modules() if isinstance(m, GroupedSequentialMLP)]
    assert mods and all(m.impl == "grouped_mm" for m in mods)
    return mods


@cpu_model
def test_grouped_experts_match_hf_logits_and_gradients(grouped):
    from nemo_qwen3_next.ops import usage

    hf = random_hf_model(tiny_hf_config(), seed=1)  # hybrid: MoE + gated shared expert + a dense layer
    ours = load_hf(hf, backend="local", linear_attention_chunk_size=16)
    _experts(ours)
    usage.reset()
    torch.manual_seed(3)
    ids = torch.randint(0, hf.config.vocab_size, (2, 37))
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    logits_hf, logits = hf(ids, use_cache=False).logits, ours(ids, pos, None)
    assert (logits - logits_hf).abs().max().item() <= 1e-4
    assert "moe_experts:grouped_mm" in usage.kernels_used()  # what the training log reports

    def lm_loss(x):
        return F.cross_entropy(x[:, :-1].reshape(-1, x.shape[-1]), ids[:, 1:].reshape(-1))

    lm_loss(logits_hf).backward()
    lm_loss(logits).backward()
    grads = ours_to_hf({n: p.grad for n, p in ours.named_parameters()}, ours.config)
    hf_params = dict(hf.named_parameters())
    experts = 0
    for name, g in grads.items():
        ref = hf_params[name].grad
        rel = ((g - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        assert rel <= 1e-4, f"{name}: relative gradient error {rel}"
        experts += ".mlp.experts." in name
    assert experts > 0


def test_grouped_forward_equals_the_loop_with_an_idle_expert(grouped):
    hf = random_hf_model(tiny_hf_config(), seed=2)
    module = _experts(load_hf(hf, backend="local").cpu())[0]
    E, H = module.num_local_experts, module.config.hidden_size
    counts = torch.tensor([5, 0] + [3] * (E - 2))  # expert 1 gets no token
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(int(counts.sum()), H, generator=gen)
    probs = torch.rand(int(counts.sum()), generator=gen)
    probe = torch.randn(int(counts.sum()), H, generator=gen)

    def run(fn):
        module.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out, bias = fn(xi, counts, probs)
        assert bias is None
        (out * probe).sum().backward()
        return out.detach(), xi.grad, [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                                      for p in module.parameters()]

    out_g, dx_g, dw_g = run(module.forward)
    out_l, dx_l, dw_l = run(lambda *a: super(GroupedSequentialMLP, module).forward(*a))
    torch.testing.assert_close(out_g, out_l, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_g, dx_l, rtol=1e-5, atol=1e-5)
    for a, b in zip(dw_g, dw_l):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert dw_g[2].abs().sum() == 0  # the idle expert's fc1 gets no gradient, as in the loop


def test_unsupported_config_names_the_switch(monkeypatch):
    from nemo_qwen3_next.config import qwen3_next_tiny_5m
    from nemo_qwen3_next.model import build_model, init_single_process

    init_single_process()
    monkeypatch.setenv("QWEN3_NEXT_MOE_EXPERTS", "grouped_mm")
    with pytest.raises(ValueError, match="QWEN3_NEXT_MOE_EXPERTS=grouped_mm does not support expert biases"):
        build_model(qwen3_next_tiny_5m(add_bias_linear=True), backend="local")
    monkeypatch.setenv("QWEN3_NEXT_MOE_EXPERTS", "grouped")
    with pytest.raises(ValueError, match="QWEN3_NEXT_MOE_EXPERTS='grouped'"):
        build_model(qwen3_next_tiny_5m(), backend="local")


def test_auto_picks_grouped_only_where_torch_has_the_fast_kernel(monkeypatch):
    """Default ``auto``: the loop on CPU / fp32 / pre-Hopper / misaligned widths, grouped GEMMs on sm90+ bf16."""
    from nemo_qwen3_next.config import qwen3_next_tiny_5m
    from nemo_qwen3_next.modules.grouped_experts import auto_uses_grouped

    cfg = qwen3_next_tiny_5m()
    cuda, bf16 = torch.device("cuda", 0), torch.bfloat16
    assert not auto_uses_grouped(cfg, 64, torch.device("cpu"), bf16)
    capability = {"cap": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["cap"])
    assert auto_uses_grouped(cfg, 64, cuda, bf16)
    assert not auto_uses_grouped(cfg, 64, cuda, torch.float32)
    assert not auto_uses_grouped(cfg, 60, cuda, bf16)  # F/tp rows not 16-byte aligned
    assert not auto_uses_grouped(qwen3_next_tiny_5m(add_bias_linear=True), 64, cuda, bf16)
    capability["cap"] = (8, 0)
    assert not auto_uses_grouped(cfg, 64, cuda, bf16)


@cpu_model
def test_default_is_auto_and_runs_the_loop_on_cpu(monkeypatch):
    from nemo_qwen3_next.ops import usage

    monkeypatch.delenv("QWEN3_NEXT_MOE_EXPERTS", raising=False)
    hf = random_hf_model(tiny_hf_config(), seed=4)
    ours = load_hf(hf, backend="local")
    mods = [m for m in ours.modules() if isinstance(m, GroupedSequentialMLP)]
    assert mods and all(m.impl == "auto" for m in mods)
    usage.reset()
    ids = torch.randint(0, hf.config.vocab_size, (1, 11))
    logits = ours(ids, torch.arange(11).unsqueeze(0), None)
    torch.testing.assert_close(logits, hf(ids, use_cache=False).logits, rtol=1e-4, atol=1e-4)
    assert "moe_experts:sequential" in usage.kernels_used()
    assert "moe_experts:grouped_mm" not in usage.kernels_used()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_auto_grouped_equals_the_loop_in_bf16(monkeypatch):
    """On sm90+ the default takes the grouped kernels; they give the loop's output to bf16 rounding."""
    monkeypatch.delenv("QWEN3_NEXT_MOE_EXPERTS", raising=False)
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("auto uses the loop before sm90")
    hf = random_hf_model(tiny_hf_config(), seed=5)
    module = [m for m in load_hf(hf, backend="local").modules() if isinstance(m, GroupedSequentialMLP)][0]
    module = module.to("cuda", torch.bfloat16)
    E, H = module.num_local_experts, module.config.hidden_size
    counts = torch.tensor([7, 0] + [5] * (E - 2))
    x = torch.randn(int(counts.sum()), H, device="cuda", dtype=torch.bfloat16)
    probs = torch.rand(int(counts.sum()), device="cuda")
    assert module._grouped(x)
    out_g, _ = module(x, counts, probs)
    out_l, _ = super(GroupedSequentialMLP, module).forward(x, counts, probs)
    err = ((out_g.float() - out_l.float()).norm() / out_l.float().norm()).item()
    assert err <= 1e-2, f"grouped vs loop relative error {err}"


def test_stacked_weights_are_reused_without_grad_and_follow_updates(monkeypatch):
    """Inference reuses the stacked expert weights until a weight changes in place; autograd restacks."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("needs torch._grouped_mm")
    monkeypatch.setenv("QWEN3_NEXT_MOE_EXPERTS", "grouped_mm")
    hf = random_hf_model(tiny_hf_config(), seed=1)
    model = load_hf(hf, linear_attention_chunk_size=16)
    experts = model.decoder.layers[0].mlp.experts
    with torch.no_grad():
        a1, _ = experts._stacked_weights()
        b1, _ = experts._stacked_weights()
        assert a1 is b1  # reused
        experts.local_experts[1].linear_fc1.weight.mul_(2.0)  # an in-place update, as an optimizer step
        a2, _ = experts._stacked_weights()
        assert a2 is not a1 and torch.equal(a2[1], experts.local_experts[1].linear_fc1.weight)
    w1, _ = experts._stacked_weights()  # grad mode: a fresh stack that carries gradients
    assert w1.requires_grad and w1 is not a2
