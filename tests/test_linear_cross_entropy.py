"""The fused LM head + cross-entropy equals the unfused definition: loss and gradients, CPU fp32.

References: `linear_cross_entropy_ref` (fp32 logits + torch's cross-entropy) for the op, Megatron's
own unfused `GPTModel` loss (the same model with `fused_linear_cross_entropy=False`) and HF's logits
for the model. The upstream gradient is non-uniform (a loss mask and weights), which kernels that
precompute dW for a mean loss would get wrong.
"""

import pytest
import torch
import torch.nn.functional as F

from nemo_qwen3_next import load_hf
from nemo_qwen3_next.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from nemo_qwen3_next.ops.usage import kernels_used, reset
from nemo_qwen3_next.testing import random_hf_model, tiny_hf_config


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("chunk", [7, None], ids=["chunked", "default_chunk"])
def test_op_matches_unfused_definition(chunk):
    torch.manual_seed(0)
    x = torch.randn(3, 11, 32, dtype=torch.float64).float().requires_grad_()
    w = (0.3 * torch.randn(97, 32)).requires_grad_()
    t = torch.randint(0, 97, (3, 11))
    g = torch.rand(3, 11) * (torch.rand(3, 11) > 0.3)  # masked, non-uniform upstream gradient
    loss = linear_cross_entropy(x, w, t, chunk_tokens=chunk)
    (loss * g).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref = linear_cross_entropy_ref(x, w, t)
    (ref * g).sum().backward()
    assert loss.dtype == torch.float32 and loss.shape == t.shape
    assert _rel(loss, ref) <= 1e-6
    assert _rel(gx, x.grad) <= 1e-6 and _rel(gw, w.grad) <= 1e-6


def test_op_rejects_mismatched_target():
    with pytest.raises(ValueError, match="target shape"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(5, 8), torch.zeros(3, dtype=torch.long))


def _models():
    hf = random_hf_model(tiny_hf_config(), seed=1)
    return hf, load_hf(hf, linear_attention_chunk_size=16), load_hf(
        hf, linear_attention_chunk_size=16, fused_linear_cross_entropy=False
    )


def test_model_loss_and_grads_match_unfused_and_hf():
    hf, fused, plain = _models()
    torch.manual_seed(3)
    ids = torch.randint(0, 256, (2, 21))
    labels = torch.roll(ids, -1, 1)
    pos = torch.arange(21)[None].expand_as(ids)
    mask = (torch.rand(2, 21) > 0.2).float()
    reset()
    out = {}
    for name, m in (("fused", fused), ("plain", plain)):
        loss = m(ids, pos, None, labels=labels)
        ((loss * mask).sum() / mask.sum()).backward()
        out[name] = loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert "linear_cross_entropy:torch" in kernels_used()
    (lf, gf), (lp, gp) = out["fused"], out["plain"]
    assert lf.shape == (2, 21) and _rel(lf, lp) <= 1e-6
    with torch.no_grad():
        hf_loss = F.cross_entropy(hf(ids).logits.flatten(0, 1), labels.flatten(), reduction="none").view(2, 21)
    assert _rel(lf, hf_loss) <= 1e-5
    assert gf.keys() == gp.keys() and "output_layer.weight" in gf
    for n in gf:
        assert _rel(gf[n], gp[n]) <= 1e-5, n


def test_logits_path_unchanged_without_labels():
    _, fused, plain = _models()
    ids = torch.randint(0, 256, (2, 9))
    pos = torch.arange(9)[None].expand_as(ids)
    with torch.no_grad():
        assert torch.equal(fused(ids, pos, None), plain(ids, pos, None))
