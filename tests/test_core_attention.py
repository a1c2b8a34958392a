"""SDPAttention (the local core attention) against an explicit softmax-attention loop."""

import math

import pytest
import torch

from megatron.core.transformer.enums import AttnMaskType

from nemo_qwen3_next.modules.core_attention import SDPAttention


class _Cfg:
    attention_dropout = 0.0
    kv_channels = 8


def reference(q, k, v, allowed):
    """q [s,b,h,d], k/v [s,b,g,d] (GQA), allowed [b,s,s] True where a query may attend."""
    s, b, h, d = q.shape
    rep = h // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / math.sqrt(d)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), v).reshape(s, b, h * d)


@pytest.mark.parametrize("kind", ["none", "dense_causal", "reset_docs"])
def test_sdpa_masks(kind, monkeypatch):
    torch.manual_seed(0)
    s, b, h, g, d = 12, 2, 4, 2, 8
    q, k, v = torch.randn(s, b, h, d, dtype=torch.float64), torch.randn(s, b, g, d, dtype=torch.float64), \
        torch.randn(s, b, g, d, dtype=torch.float64)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    allowed = causal.expand(b, s, s).clone()
    mask = None
    if kind == "dense_causal":  # what NeMo sends without TransformerEngine: True = masked out
        mask = ~causal.expand(b, 1, s, s)
    elif kind == "reset_docs":  # reset_attention_mask: sample 0 has a document break at position 5
        allowed[0, 5:, :5] = False
        mask = ~allowed[:, None]
    seen = {}
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **kw):
        seen.update(kw)
        return sdpa(*a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    attn = SDPAttention(_Cfg(), layer_number=1, attn_mask_type=AttnMaskType.causal)
    out = attn(q, k, v, attention_mask=mask)
    torch.testing.assert_close(out, reference(q, k, v, allowed), rtol=1e-10, atol=1e-10)
    # a plain causal mask goes as is_causal (flash-eligible on GPU); a real document mask is kept
    assert (seen["attn_mask"] is None) == (kind != "reset_docs")
