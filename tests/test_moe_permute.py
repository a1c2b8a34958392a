"""The top-k token permutation (`Qwen3NextMoELayer`) = Megatron's routing-map permutation, CPU fp32.

Reference: the same model with ``moe_fast_permute=False`` (Megatron's all-gather dispatcher, one
rank) and HF transformers' logits. Both expert implementations read the permuted rows.
"""

import pytest
import torch

from nemo_qwen3_next import load_hf
from nemo_qwen3_next.modules.moe import TopKPermuteDispatcher
from nemo_qwen3_next.ops.usage import kernels_used, reset
from nemo_qwen3_next.testing import random_hf_model, tiny_hf_config


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("experts", ["sequential", "grouped_mm"])
def test_topk_permute_matches_megatron_and_hf(monkeypatch, experts):
    if experts == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("needs torch._grouped_mm")
    monkeypatch.setenv("QWEN3_NEXT_MOE_EXPERTS", experts)
    hf = random_hf_model(tiny_hf_config(num_experts=6, num_experts_per_tok=3), seed=1)
    fast = load_hf(hf, linear_attention_chunk_size=16)
    slow = load_hf(hf, linear_attention_chunk_size=16, moe_fast_permute=False)
    moe = fast.decoder.layers[0].mlp
    assert isinstance(moe.token_dispatcher, TopKPermuteDispatcher), moe.fast_permute_off
    assert not isinstance(slow.decoder.layers[0].mlp.token_dispatcher, TopKPermuteDispatcher)
    torch.manual_seed(3)
    ids = torch.randint(0, 256, (2, 19))
    pos = torch.arange(19)[None].expand_as(ids)
    reset()
    out = {}
    for name, m in (("fast", fast), ("slow", slow)):
        logits = m(ids, pos, None)
        (logits.float().pow(2).mean()).backward()
        out[name] = logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert "moe_permute:topk" in kernels_used()
    (lf, gf), (ls, gs) = out["fast"], out["slow"]
    with torch.no_grad():
        ref = hf(ids).logits
    assert (lf - ref).abs().max().item() <= 1e-4
    assert _rel(lf, ls) <= 1e-6
    assert gf.keys() == gs.keys() and any("local_experts" in n for n in gf) and any("router" in n for n in gf)
    for n in gf:
        assert _rel(gf[n], gs[n]) <= 1e-5, n
