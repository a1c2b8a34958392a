"""Our Megatron-Core Qwen3-Next equals Hugging Face's `Qwen3NextForCausalLM`, logits and gradients.

HF transformers is the independent reference: same random weights, loaded through `load_hf`
(the same path users take), fp32 on CPU.
"""

import pytest
import torch
import torch.nn.functional as F

from nemo_qwen3_next import load_hf
from nemo_qwen3_next.hf_mapping import ours_to_hf
from nemo_qwen3_next.testing import random_hf_model, tiny_hf_config

L, F_ = "linear_attention", "full_attention"

VARIANTS = {
    # both kinds, MoE with gated shared expert, a dense-MLP layer (mlp_only_layers=[1]), partial RoPE,
    # K != V head dims (16 vs 24), GQA 4:2
    "hybrid": {},
    "all_linear": dict(layer_types=[L] * 4),
    "all_full": dict(layer_types=[F_] * 4),
    "irregular": dict(num_hidden_layers=5, layer_types=[F_, L, L, F_, L], mlp_only_layers=[0, 3]),
    "mqa": dict(num_key_value_heads=1),
    "tied_dense_only": dict(num_experts=0, tie_word_embeddings=True),
}


def _pair(variant, chunk_size=16, **load_kw):
    hf = random_hf_model(tiny_hf_config(**VARIANTS[variant]), seed=1)
    ours = load_hf(hf, linear_attention_chunk_size=chunk_size, **load_kw)
    return hf, ours


def _logits(model, ids):
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    return model(ids, pos, None)


def _lm_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_hf(variant):
    hf, ours = _pair(variant)
    torch.manual_seed(2)
    ids = torch.randint(0, hf.config.vocab_size, (2, 37))  # 37: not a multiple of the chunk (16)
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
        out = _logits(ours, ids)
    assert out.shape == ref.shape
    err = (out - ref).abs().max().item()
    assert err <= 1e-4, f"max |dlogit| = {err}"


def test_recurrent_kernel_matches_hf():
    hf, ours = _pair("hybrid", linear_attention_use_recurrent=True)
    ids = torch.randint(0, hf.config.vocab_size, (2, 21))
    with torch.no_grad():
        assert (_logits(ours, ids) - hf(ids, use_cache=False).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", ["hybrid", "irregular"])
def test_loss_and_gradients_match_hf(variant):
    hf, ours = _pair(variant)
    torch.manual_seed(3)
    ids = torch.randint(0, hf.config.vocab_size, (2, 37))
    loss_hf = _lm_loss(hf(ids, use_cache=False).logits, ids)
    loss_ours = _lm_loss(_logits(ours, ids), ids)
    assert abs(loss_hf.item() - loss_ours.item()) <= 1e-4 * abs(loss_hf.item())
    loss_hf.backward()
    loss_ours.backward()

    # Our gradients, mapped to HF names/layouts by the same (linear) table as the weights.
    grads = ours_to_hf({n: p.grad for n, p in ours.named_parameters()}, ours.config)
    hf_params = dict(hf.named_parameters())
    checked = {"gdn": 0, "attention": 0, "router": 0}
    for name, g in grads.items():
        ref = hf_params[name].grad
        rel = ((g - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        assert rel <= 1e-4, f"{name}: relative gradient error {rel}"
        checked["gdn"] += ".linear_attn." in name
        checked["attention"] += ".self_attn." in name
        checked["router"] += name.endswith("mlp.gate.weight")
    assert all(checked.values()), checked


def test_packed_sequences_equal_separate_documents():
    """Packed documents (thd + cu_seqlens) give each document's own logits: GDN conv and state and
    attention all restart at the boundary, RoPE positions restart too."""
    from megatron.core.packed_seq_params import PackedSeqParams

    hf, ours = _pair("hybrid")
    torch.manual_seed(4)
    lens = [11, 20, 6]
    docs = [torch.randint(0, 256, (1, n)) for n in lens]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    packed = torch.cat(docs, dim=1)
    pos = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max(lens), max_seqlen_kv=max(lens))
    with torch.no_grad():
        out = ours(packed, pos, None, packed_seq_params=params)
        for d, start, n in zip(docs, cu[:-1].tolist(), lens):
            alone = hf(d, use_cache=False).logits
            assert (out[:, start : start + n] - alone).abs().max().item() <= 1e-4


def test_one_element_mask_is_causal_attention():
    """NeMo's mock data sends a `[b, 1, 1, 1]` False mask (its forward step needs one without TE): the model's
    logits equal HF's unmasked ones, as with a dense causal mask; a True one is refused, never NaN."""
    hf, ours = _pair("hybrid")
    ids = torch.randint(0, hf.config.vocab_size, (2, 10))
    pos = torch.arange(10).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        want = hf(ids).logits
        dense = ~torch.ones(10, 10, dtype=torch.bool).tril().expand(2, 1, 10, 10)
        for mask in (torch.zeros(2, 1, 1, 1, dtype=torch.bool), dense):
            torch.testing.assert_close(ours(ids, pos, mask), want, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match=r"attention_mask \[b, 1, 1, 1\] is True"):
            ours(ids, pos, torch.ones(2, 1, 1, 1, dtype=torch.bool))
