"""Speculative greedy decoding (`inference.speculative`) = plain greedy decoding, token for token.

The reference is our plain greedy `generate` (itself checked against HF's `generate` in test_generate.py).
Drafters that are always right (replaying the reference), always wrong (random) and mixed exercise every
accepted count, so the GDN conv/recurrent rollback after a rejection decides the later tokens; the
rollback is also compared state by state with one-token decode steps over the accepted tokens.
"""

import functools

import pytest
import torch

from nemo_qwen3_next import generate, load_hf
from nemo_qwen3_next.inference import Decoder
from nemo_qwen3_next.inference.forward import Batch, forward
from nemo_qwen3_next.inference.speculative import Drafter, SpeculativeStats, accept_count, rollback
from nemo_qwen3_next.testing import random_hf_model, tiny_hf_config

L, F_ = "linear_attention", "full_attention"
VARIANTS = {"hybrid": {}, "all_linear": dict(layer_types=[L] * 4), "all_full": dict(layer_types=[F_] * 4)}
T, NEW, VOCAB = 11, 64, 256


@functools.lru_cache(maxsize=None)
def _setup(variant):
    """A tiny random model, a prompt, and its plain greedy continuation (the reference)."""
    hf = random_hf_model(tiny_hf_config(**VARIANTS[variant]), seed=1)
    model = load_hf(hf, linear_attention_chunk_size=16)
    ids = torch.randint(1, VOCAB, (1, T), generator=torch.Generator().manual_seed(0))
    return model, ids, generate(model, ids, NEW)[0, T:]


@pytest.fixture
def setup():
    return _setup("hybrid")


class Replay(Drafter):
    """Proposes the reference continuation, each token replaced by a wrong one with probability ``wrong``."""

    def __init__(self, ref, wrong: float, seed: int = 0):
        self.ref, self.wrong, self.g = ref, wrong, torch.Generator().manual_seed(seed)

    def propose(self, tokens, hidden, k):
        i = tokens.numel() - T  # generated tokens so far: the next one is ref[i]
        d = torch.cat([self.ref[i:i + k], torch.zeros(k, dtype=torch.long)])[:k]  # past the end: anything
        bad = torch.rand(k, generator=self.g) < self.wrong
        d[bad] = (d[bad] + torch.randint(1, VOCAB, (int(bad.sum()),), generator=self.g)) % VOCAB  # != ref
        return d


DRAFTERS = {"right": 0.0, "wrong": 1.0, "mixed": 0.4}


# every drafter on the hybrid model; the mixed one (every accepted count) on single-kind models
CASES = [("hybrid", d) for d in DRAFTERS] + [(v, "mixed") for v in VARIANTS if v != "hybrid"]


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("variant,drafter", CASES)
def test_speculative_greedy_equals_plain_greedy(variant, drafter, k):
    model, ids, ref = _setup(variant)
    stats = SpeculativeStats()
    out = generate(model, ids, NEW, speculative_k=k, draft=Replay(ref, DRAFTERS[drafter]), stats=stats)
    assert out.shape == (1, T + NEW) and torch.equal(out[0, :T], ids[0])
    assert torch.equal(out[0, T:], ref), (out[0, T:] != ref).nonzero()[:1]
    print(f"k={k} {drafter}: {stats}")
    assert stats.emitted == NEW and stats.accepted + stats.rounds == NEW - 1  # every later token from a round
    if drafter == "right":
        assert stats.accepted == stats.drafted
    if drafter == "wrong":
        assert stats.accepted == 0
    if drafter == "mixed":
        assert 0 < stats.accepted < stats.drafted
        counts = set(stats.accepted_per_round)
        assert 0 in counts and (k == 1 or counts & set(range(1, k)))  # rejections at the first and a later draft


@pytest.mark.parametrize("accepted", [0, 2, 3])
def test_rollback_equals_one_token_steps(setup, accepted):
    """After a verify of k = 3 drafts with ``accepted`` right ones, every state tensor equals that of plain
    one-token steps over the pending token and the accepted drafts."""
    model, ids, ref = setup
    k = 3
    spec, plain = Decoder(model, 1, T + 8), Decoder(model, 1, T + 8)
    first = spec.prefill([ids[0]]).argmax(-1)
    plain.prefill([ids[0]])
    drafts = ref[1:1 + k].clone()
    drafts[accepted:] = (drafts[accepted:] + 7) % VOCAB if accepted < k else drafts[accepted:]
    batch = Batch(spec.positions + torch.arange(k + 1)[:, None], keep_states=True)
    with torch.no_grad():
        logits = forward(model, spec.state, torch.cat([first, drafts])[:, None], batch, spec.rope)
    a = accept_count(drafts[None], logits[:, 0].argmax(-1)[None])
    assert int(a) == accepted
    rollback(spec.state, batch.gdn_states, a)
    spec.positions += a + 1
    for tok in torch.cat([first, drafts[:accepted]]):
        step_logits = plain.step(tok.view(1))
    assert torch.equal(spec.positions, plain.positions)
    assert (logits[accepted, 0] - step_logits[0]).abs().max() <= 1e-5  # the verify's logits = the step's
    P = int(plain.positions)
    for s, p in zip(spec.state.tensors(), plain.state.tensors()):
        if s.dim() == 4 and s.shape[2] == spec.state.max_length:  # K/V: the slots the next query sees
            s, p = s[:, :, :P], p[:, :, :P]
        assert (s - p).abs().max() <= 1e-5


def test_drafter_gets_the_hidden_states_before_the_final_norm(setup):
    """``hidden`` handed to a drafter = the last layer's output (input of the final norm) of a full forward
    over the accepted tokens, at the positions that became final since the previous call."""
    model, ids, ref = setup
    calls = []

    class Recorder(Replay):
        needs_hidden = True

        def propose(self, tokens, hidden, k):
            calls.append((tokens.clone(), hidden.clone()))
            return super().propose(tokens, hidden, k)

    generate(model, ids, 20, speculative_k=2, draft=Recorder(ref, 0.5))
    seen = []
    hook = model.decoder.final_layernorm.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    try:
        with torch.no_grad():
            tokens = calls[-1][0]
            model(tokens[None], torch.arange(tokens.numel())[None], None)
    finally:
        hook.remove()
    full = seen[0][:, 0]  # [n, H]
    covered = 0
    for tokens, hidden in calls:
        n, m = tokens.numel(), hidden.shape[0]
        assert n - 1 - m == covered  # exactly the positions not handed over before
        assert (hidden - full[n - 1 - m:n - 1]).abs().max() <= 1e-5
        covered = n - 1


def test_speculative_stops_at_eos_like_plain(setup):
    model, ids, ref = setup
    eos = int(ref[9])
    plain = generate(model, ids, NEW, eos_token_id=eos)
    for wrong in (0.0, 0.5):
        out = generate(model, ids, NEW, eos_token_id=eos, speculative_k=3, draft=Replay(ref, wrong))
        assert torch.equal(out, plain)


def test_speculative_refuses_what_it_does_not_support(setup):
    model, ids, ref = setup
    d = Replay(ref, 0.0)
    with pytest.raises(ValueError, match="batch 1"):
        generate(model, ids.repeat(2, 1), 4, speculative_k=2, draft=d)
    with pytest.raises(ValueError, match="greedy only"):
        generate(model, ids, 4, speculative_k=2, draft=d, temperature=0.7)
    with pytest.raises(ValueError, match="speculative_k = 0"):
        generate(model, ids, 4, speculative_k=0, draft=d)
    with pytest.raises(ValueError, match="draft = "):
        generate(model, ids, 4, speculative_k=2, draft="ngram")


@functools.lru_cache(maxsize=None)
def _mtp_setup():
    """A tiny HF checkpoint with random `mtp.*` tensors, loaded with its MTP block; prompt; plain greedy."""
    import tempfile

    from nemo_qwen3_next import testing

    path = tempfile.mkdtemp(prefix="spec_mtp_")
    testing.save_hf_with_mtp(path, seed=1)
    model = load_hf(path, linear_attention_chunk_size=16)
    ids = torch.randint(1, VOCAB, (1, T), generator=torch.Generator().manual_seed(0))
    return model, ids, generate(model, ids, NEW)[0, T:]


def _need_mtp():
    pytest.importorskip("nemo_qwen3_next.modules.mtp")  # the MTP block (issue 14, the other half)
    from nemo_qwen3_next import testing

    if not hasattr(testing, "save_hf_with_mtp"):
        pytest.skip("needs nemo_qwen3_next.testing.save_hf_with_mtp (MTP checkpoints)")


@pytest.mark.parametrize("k", [1, 2, 4])
def test_mtp_drafter_speculative_equals_plain_greedy(k):
    _need_mtp()
    model, ids, ref = _mtp_setup()
    stats = SpeculativeStats()
    out = generate(model, ids, NEW, speculative_k=k, draft="mtp", stats=stats)
    print(f"k={k} mtp (random mtp.* weights): {stats}")
    assert torch.equal(out[0, T:], ref)
    assert stats.emitted == NEW and stats.accepted + stats.rounds == NEW - 1


def test_mtp_drafter_cache_equals_the_full_sequence_reference():
    """The drafter's MTP layer with its KV cache, fed in two catch-up chunks (as rounds do), gives the
    logits of `mtp_logits_reference` over the whole sequence (no cache), and its first draft is their argmax."""
    _need_mtp()
    from nemo_qwen3_next.inference.speculative import MTPDrafter
    from nemo_qwen3_next.modules.mtp import hidden_before_final_norm, mtp_logits_reference

    model, ids, ref = _mtp_setup()
    seq = torch.cat([ids[0], ref[:20]])
    n = seq.numel()
    h = hidden_before_final_norm(model, seq[None, :-1])  # [1, n-1, H]
    want = mtp_logits_reference(model, h, seq[None, 1:])[0]  # [n-1, V]
    drafter = MTPDrafter(model)
    with torch.no_grad():
        first = drafter.propose(seq[:16], h[0, :15], 1)  # positions 0..14; its cache then holds them
        assert int(first[0]) == int(want[14].argmax())
        drafter._ensure(n + 1, seq.device, h.dtype)  # grows the cache, keeps positions 0..14
        got, _ = drafter._layer(model.decoder.final_layernorm(h[0, 15:, None]), seq[16:], torch.arange(15, n - 1))
    assert (got - want[15:]).abs().max() <= 1e-5
