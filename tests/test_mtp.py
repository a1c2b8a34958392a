"""The Qwen3-Next MTP block (CPU, fp32, tiny random checkpoint with `mtp.*` tensors).

The reference is written here from the HF tensors: plain-torch zero-centred RMSNorms, `mtp.fc`, the
shared embedding and LM head, and transformers' own `Qwen3NextDecoderLayer` (gated attention + MoE)
loaded with the `mtp.layers.0.*` tensors, fed the HF main model's last hidden state (after `model.norm`,
as vLLM feeds its MTP). Nothing of ours is used to compute it.
"""

import pytest
import torch

pytest.importorskip("transformers")

from nemo_qwen3_next.testing import random_mtp_layer, save_hf_with_mtp

SEED = 0


def _rms(x, w, eps):  # HF Qwen3-Next RMSNorm: zero-centred gain (1 + w), computed in fp32
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w.float())).to(x.dtype)


def reference_mtp_logits(hf, mtp, ids):
    """[B, T-1, V]: at t, logits for token t+2 from the HF main model's state at t and token t+1."""
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRotaryEmbedding

    cfg = hf.config
    eps = cfg.rms_norm_eps
    layer = random_mtp_layer(cfg, seed=SEED)  # the HF class; weights replaced by the checkpoint's below
    layer.load_state_dict({k[len("mtp.layers.0."):]: v for k, v in mtp.items() if k.startswith("mtp.layers.0.")})
    with torch.no_grad():
        h = hf.model(ids).last_hidden_state[:, :-1]  # after model.norm
        nxt = ids[:, 1:]
        e = hf.model.embed_tokens.weight[nxt]
        x = torch.cat([_rms(e, mtp["mtp.pre_fc_norm_embedding.weight"], eps),
                       _rms(h, mtp["mtp.pre_fc_norm_hidden.weight"], eps)], -1) @ mtp["mtp.fc.weight"].T
        T = x.shape[1]
        pos = torch.arange(T)[None]
        cos_sin = Qwen3NextRotaryEmbedding(cfg)(x, pos)
        mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
        out = layer(x, position_embeddings=cos_sin, attention_mask=mask, position_ids=pos)
        out = out[0] if isinstance(out, tuple) else out
        return _rms(out, mtp["mtp.norm.weight"], eps) @ hf.lm_head.weight.T


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mtp_hf"))
    hf, mtp = save_hf_with_mtp(path, seed=SEED)
    torch.manual_seed(5)
    ids = torch.randint(0, hf.config.vocab_size, (2, 24))
    return dict(path=path, hf=hf, mtp=mtp, ids=ids, ref=reference_mtp_logits(hf, mtp, ids))


@pytest.fixture(scope="module")
def ours(ckpt):
    from nemo_qwen3_next import load_hf

    return load_hf(ckpt["path"])


def test_mtp_logits_equal_plain_torch_reference(ckpt, ours):
    from nemo_qwen3_next.modules.mtp import hidden_before_final_norm, mtp_logits_reference

    ids = ckpt["ids"]
    assert ours.config.mtp_num_layers == 1
    hidden = hidden_before_final_norm(ours, ids)  # [B, T, H]
    got = mtp_logits_reference(ours, hidden[:, :-1], ids[:, 1:])
    ref = ckpt["ref"]
    assert got.shape == ref.shape
    err = (got - ref).abs().max().item()
    assert err <= 1e-5, err
    # the main model is untouched by the MTP block
    with torch.no_grad():
        main = ours(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None].expand_as(ids), attention_mask=None)
        assert (main - ckpt["hf"](ids).logits).abs().max().item() <= 1e-4


def test_mtp_parts_are_the_hf_submodules(ckpt, ours):
    """The names inference code uses hold the HF tensors (fc and the norms byte for byte)."""
    from nemo_qwen3_next.modules.mtp import mtp_parts

    p = mtp_parts(ours)
    mtp = ckpt["mtp"]
    assert torch.equal(p.fc.weight, mtp["mtp.fc.weight"])
    assert torch.equal(p.pre_fc_norm_embedding.weight, mtp["mtp.pre_fc_norm_embedding.weight"])
    assert torch.equal(p.pre_fc_norm_hidden.weight, mtp["mtp.pre_fc_norm_hidden.weight"])
    assert torch.equal(p.norm.weight, mtp["mtp.norm.weight"])
    assert p.layer.layer_type == "full_attention" and p.layer.layer_number == ours.config.num_layers + 1


def test_mtp_loss_is_next_next_token_cross_entropy(ckpt, ours):
    """Forward with labels: the tracked MTP loss = CE of the reference MTP logits against token t+2, the
    returned loss = the main model's per-token CE; backward reaches the MTP weights with the scale."""
    import torch.nn.functional as F

    from nemo_qwen3_next.modules.mtp import MTPLossTracker

    ids, ref, hf = ckpt["ids"], ckpt["ref"], ckpt["hf"]
    labels = torch.roll(ids, -1, 1)  # labels[t] = token t+1 (last position: anything, masked)
    mask = torch.ones_like(ids, dtype=torch.float)
    mask[:, -1] = 0
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    MTPLossTracker.pop()
    ours.train()
    try:
        ours.zero_grad()
        loss = ours(input_ids=ids, position_ids=pos, attention_mask=None, labels=labels, loss_mask=mask)
        tracked = MTPLossTracker.pop()
    finally:
        ours.eval()
    with torch.no_grad():
        main_ref = F.cross_entropy(hf(ids).logits.transpose(1, 2), labels, reduction="none")
    assert (loss.detach() - main_ref).abs().max().item() <= 1e-4
    # MTP at t (t <= T-3) predicts token t+2 = ids[t+2]; t = T-2 has no target (mask rolled)
    mtp_ce = F.cross_entropy(ref[:, :-1].transpose(1, 2), ids[:, 2:], reduction="none")
    assert abs(tracked[0].item() - mtp_ce.mean().item()) <= 1e-5
    # gradient: d/dw of (sum(main * mask) + scale * mean mtp) -> the MTP weights get scale * d mean_mtp
    (loss * mask).sum().backward()
    g = ours.mtp.layers[0].eh_proj.weight.grad
    assert g is not None and g.abs().sum() > 0


def test_mtp_forward_flops_match_the_flop_counter(ckpt, ours, monkeypatch):
    """`training.flops`' ``mtp`` term = what torch's FLOP counter measures for the block over a sequence
    (fc, gated attention with naive full-matrix scores, routed + shared experts, router, LM head)."""
    from torch.utils.flop_counter import FlopCounterMode

    from nemo_qwen3_next.modules.mtp import hidden_before_final_norm, mtp_logits_reference
    from nemo_qwen3_next.training.flops import forward_flops_per_token

    from test_pretrain_config import _naive_sdpa as naive_sdpa  # plain-matmul attention the counter sees

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", naive_sdpa)
    ids = ckpt["ids"]
    b, s = ids.shape
    hidden = hidden_before_final_norm(ours, ids)
    counter = FlopCounterMode(display=False)
    with counter:
        mtp_logits_reference(ours, hidden, torch.roll(ids, -1, 1))
    measured = sum(counter.get_flop_counts()["Global"].values())
    c = ours.config
    mtp = forward_flops_per_token(c, s)["mtp"]
    n, d = c.num_attention_heads, c.kv_channels
    causal_core, full_core = 2 * 2 * n * d * (s + 1) / 2, 2 * 2 * n * d * s  # we count causal, naive does all
    assert measured == pytest.approx((mtp - causal_core + full_core) * b * s, rel=1e-6)


def _pretrain_mtp_helpers():
    import test_pretrain_train as tp  # tests/ is on sys.path under pytest

    return tp


def test_pretraining_with_mtp_both_losses_fall_and_resume_is_exact(tmp_path, corpus_cache):
    """The tiny model with ``model.mtp_num_layers=1``: the LM loss and the logged MTP loss both fall;
    a run stopped at its step-6 checkpoint and rerun gives the same steps 7-12 (both losses)."""
    import sys

    tp = _pretrain_mtp_helpers()
    steps, every = 12, 6

    def args(run_dir):
        return [f"run_dir={run_dir}", f"data.cache_dir={corpus_cache}", f"trainer.max_steps={steps}",
                f"checkpoint.every_n_steps={every}", "trainer.val_check_interval=1000", "optim.warmup_steps=2",
                "data.micro_batch_size=8", "model.mtp_num_layers=1", "model.mtp_loss_scaling_factor=0.3"]

    ref_dir = tmp_path / "ref"
    out = tp._run([sys.executable, tp.PRETRAIN, *args(ref_dir)], cwd=tmp_path).stdout
    rec = tp._losses(ref_dir)
    assert sorted(rec) == list(range(1, steps + 1))
    assert all("mtp_loss" in r for r in rec.values()), rec[1]
    first, last = rec[1], {k: sum(rec[s][k] for s in range(steps - 2, steps + 1)) / 3 for k in ("loss", "mtp_loss")}
    assert last["loss"] < first["loss"] - 1.0 and last["mtp_loss"] < first["mtp_loss"] - 1.0, (first, last)
    assert f"mtp loss {rec[steps]['mtp_loss']:.4f}" in out

    stopped = tp._stopped_at_first_checkpoint(ref_dir, tmp_path / "stopped", every)
    out = tp._run([sys.executable, tp.PRETRAIN, *args(stopped)], cwd=tmp_path).stdout
    assert f"resuming {stopped} from step {every} " in out, out[:2000]
    got = tp._losses(stopped)
    for s in range(every + 1, steps + 1):
        for k in ("loss", "mtp_loss"):
            assert got[s][k] == pytest.approx(rec[s][k], abs=tp.RESUME_ATOL), (s, k)
