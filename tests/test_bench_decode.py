"""`examples/bench_decode.py --decode-train-steps`: the trained-model path of the speculative benchmark (CPU).

`test_speculative.py` already shows speculative greedy = plain greedy for every drafter and rollback case;
here: the synthetic corpus is the chain its docstring claims (entropy floor, second order), and the
benchmark trains the model with its MTP layer (both losses fall) and then reports speculative rows that
reproduce plain greedy decoding, with an acceptance rate in [0, 1].
"""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))


def _conditional_entropy(context, nxt):
    """Plug-in H(next | context) in nats from two equal-length integer tensors."""
    import torch

    pair = context * (int(nxt.max()) + 1) + nxt
    ctx_ids, ctx_inv, ctx_counts = torch.unique(context, return_inverse=True, return_counts=True)
    pair_ids, pair_inv, pair_counts = torch.unique(pair, return_inverse=True, return_counts=True)
    p_pair = pair_counts.double() / pair.numel()
    ctx_of_pair = torch.zeros_like(pair_ids).scatter_(0, pair_inv, ctx_inv)
    return -(p_pair * (pair_counts.double() / ctx_counts[ctx_of_pair].double()).log()).sum().item()


def test_corpus_entropy_floor_and_second_order():
    """Counted from samples: H(x_t | class(x_{t-2}), x_{t-1}) = the stated floor, and x_{t-1} alone leaves
    more uncertainty (the chain is second order, not a bigram table)."""
    import torch

    from bench_decode_train import MarkovCorpus

    c = MarkovCorpus(vocab=1000, symbols=16, classes=2, seed=3)
    ids = c.sample(100, 600, seed=4)
    assert set(ids.unique().tolist()) <= set(c.ids.tolist())
    sym = torch.full((1000,), -1, dtype=torch.long)
    sym[c.ids] = torch.arange(16)
    s = sym[ids]
    prev2, prev1, nxt = s[:, :-2].flatten(), s[:, 1:-1].flatten(), s[:, 2:].flatten()
    second = c.cls[prev2] * 16 + prev1
    assert _conditional_entropy(second, nxt) == pytest.approx(c.entropy_floor(), abs=0.01)
    assert _conditional_entropy(prev1, nxt) > c.entropy_floor() + 0.2
    # the corpus follows its dominant token about p of the time (the chain's own rate, as the bench reports it)
    assert c.dominant_rate(ids[:, :2], ids[:, 2:]) == pytest.approx(c.p, abs=0.01)


def test_trained_speculative_rows(tmp_path):
    """Train the tiny model with an MTP layer a few steps, then eager and speculative rows (replay and
    mtp drafters): both losses fall, the speculative tokens equal plain greedy's, the JSON holds it all."""
    import bench_decode

    out = tmp_path / "decode.json"
    result = bench_decode.main(["--decode-config", "tiny", "--decode-batches", "1", "--decode-impls", "eager",
                                "--speculative", "2", "--decode-draft", "replay,mtp", "--decode-train-steps", "6",
                                "--decode-train-batch", "2", "--decode-train-seq", "32", "--decode-train-lr", "3e-3",
                                "--decode-prompt-len", "16", "--decode-new-tokens", "12", "--decode-out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["mtp_layers"] == 1 and result["prompts"].startswith("corpus")
    train = result["train"]
    assert "error" not in train and train["completed_steps"] == 6
    for name in ("lm", "mtp"):
        losses = train[f"{name}_losses"]
        assert len(losses) == 6 and sum(losses[-2:]) / 2 < losses[0] - 0.3, (name, losses)
    assert train["corpus"]["entropy_floor_nats"] == pytest.approx(0.4349, abs=1e-4)
    rows = {r["impl"]: r for r in result["rows"]}
    assert set(rows) == {"eager", "spec_replay_k2", "spec_mtp_k2"}, rows
    assert 0.0 <= rows["eager"]["greedy_follows_chain"] <= 1.0
    for impl in ("spec_replay_k2", "spec_mtp_k2"):
        r = rows[impl]
        assert "error" not in r, r
        assert r["tokens_equal_eager"] is True and 0.0 <= r["acceptance_rate"] <= 1.0
    assert rows["spec_replay_k2"]["acceptance_rate"] == 1.0  # fp32 on CPU: replaying greedy is always right
    spec = result["acceptance"]["speculative"]
    assert spec["plain"] == "eager" and spec["tokens_equal_plain_greedy"] is True
    assert spec["mtp_acceptance_rate"] == {"2": rows["spec_mtp_k2"]["acceptance_rate"]}
