"""GPU checks of generation: the CUDA-graph decode step against the same step run eagerly.

Skipped without CUDA. Run on the GPU machine: ``python3 -m pytest -q -s tests/test_gpu_generate.py``.
The graph replays exactly the eager step's kernels (and the MoE unpermutation has a fixed summation
order), so logits and tokens must be bitwise equal; the CPU suite checks the eager step against HF.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TINY = dict(linear_key_head_dim=32, linear_value_head_dim=64)


@pytest.fixture(scope="module")
def model():
    from nemo_qwen3_next.config import qwen3_next_tiny_5m
    from nemo_qwen3_next.model import build_model, init_distributed

    init_distributed()
    torch.manual_seed(0)
    cfg = qwen3_next_tiny_5m(params_dtype=torch.bfloat16, bf16=True, **TINY)
    return build_model(cfg, backend="local").cuda().eval()


def _prompts(lengths=(37, 5, 20)):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 512, (n,), generator=g).cuda() for n in lengths]


def test_graphed_decode_step_equals_eager(model):
    from nemo_qwen3_next.inference import Decoder

    prompts = _prompts()
    graph = Decoder(model, 3, 37 + 24, cuda_graph=True)
    eager = Decoder(model, 3, 37 + 24, cuda_graph=False, sync_free=True)
    with warnings.catch_warnings():
        # a failed capture falls back with this warning; other libraries' warnings (megatron-core's
        # tp_group DeprecationWarning failed the first H200 run under simplefilter("error")) are not ours
        warnings.filterwarnings("error", message="decode step not captured")
        a, b = graph.prefill(prompts), eager.prefill(prompts)
        for t, s in zip(eager.state.tensors(), graph.state.tensors()):  # decode from the very same state
            t.copy_(s)
        a = b = a.clone()
        for step in range(24):
            tok = a.argmax(-1)
            a, b = graph.step(tok).clone(), eager.step(tok)
            assert torch.equal(a, b), (step, (a.float() - b.float()).abs().max().item())
    assert graph._graph is not None


def test_generate_on_cuda_equals_the_eager_step(model):
    """`generate` (left-padded batch, CUDA graph by default) = a greedy loop over the eager step."""
    from nemo_qwen3_next import generate
    from nemo_qwen3_next.inference import Decoder

    prompts = _prompts()
    T = max(p.numel() for p in prompts)
    ids = torch.zeros(3, T, dtype=torch.long, device="cuda")
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, T - p.numel():], mask[b, T - p.numel():] = p, 1
    fast = generate(model, ids, 32, attention_mask=mask)[:, T:]
    eager = Decoder(model, 3, T + 32, cuda_graph=False, sync_free=True)
    tok = eager.prefill(prompts).argmax(-1)
    slow = [tok]
    for _ in range(31):
        tok = eager.step(tok).argmax(-1)
        slow.append(tok)
    assert torch.equal(fast, torch.stack(slow, 1))
    sampled = [generate(model, ids, 16, attention_mask=mask, temperature=1.0, top_p=0.9, seed=3) for _ in range(2)]
    assert torch.equal(*sampled)


class _Replay:
    """Drafts a known continuation, each token replaced by a wrong one with probability ``wrong``."""

    needs_hidden = False

    def __init__(self, T, ref, wrong, vocab=512):
        self.T, self.ref, self.wrong, self.vocab = T, ref, wrong, vocab
        self.g = torch.Generator(device="cuda").manual_seed(0)

    def propose(self, tokens, hidden, k):
        i = tokens.numel() - self.T
        d = torch.cat([self.ref[i:i + k], self.ref[:k]])[:k].clone()
        bad = torch.rand(k, generator=self.g, device="cuda") < self.wrong
        return torch.where(bad, (d + 1 + torch.randint(0, self.vocab - 1, (k,), generator=self.g, device="cuda"))
                           % self.vocab, d)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("wrong", [0.0, 1.0, 0.4], ids=["right", "wrong", "mixed"])
def test_speculative_on_cuda_follows_the_eager_step(model, k, wrong):
    """bf16 kernel path: speculative greedy (eager verify over k+1 tokens, fla's fused recurrent per token,
    rollback) against our eager one-token greedy loop, 64 tokens.

    The verify's GEMMs have k+1 rows where the step's have one, so bf16 may round differently: tokens must
    agree until the first difference, and a difference is allowed only at a near-tie of the step's logits
    (the speculative token's logit within 4 bf16 ulps of the step's best one at that position).
    """
    from nemo_qwen3_next.inference import Decoder, SpeculativeStats, generate

    prompt = _prompts((23,))[0]
    T, n = prompt.numel(), 64
    eager = Decoder(model, 1, T + n, cuda_graph=False, sync_free=True)
    logits = eager.prefill([prompt]).float()
    ref, ref_logits = [], []
    for i in range(n):
        ref_logits.append(logits[0])
        ref.append(logits[0].argmax())
        if i + 1 < n:
            logits = eager.step(ref[-1].view(1)).float()
    ref = torch.stack(ref)
    stats = SpeculativeStats()
    out = generate(model, prompt[None], n, speculative_k=k, draft=_Replay(T, ref, wrong), stats=stats)[0, T:]
    diff = (out != ref).nonzero()
    j = int(diff[0]) if diff.numel() else n
    print(f"k={k} wrong={wrong}: {stats}; agree with the eager step for {j}/{n} tokens")
    if j < n:
        best = ref_logits[j].max()
        tol = 4 * torch.finfo(torch.bfloat16).eps * best.abs().clamp(min=1.0)
        print(f"  first difference at {j}: margin {(best - ref_logits[j][out[j]]).item():.4g}, tolerance {tol.item():.4g}")
        assert best - ref_logits[j][out[j]] <= tol, (j, best.item(), ref_logits[j][out[j]].item())
    assert stats.emitted == n and stats.accepted + stats.rounds == n - 1
    if wrong == 1.0:
        assert stats.accepted <= 2  # a random token may be right by chance (vocab 512)


def test_graphed_mtp_drafting_equals_eager():
    """`MTPDrafter` with its drafting replayed from CUDA graphs proposes exactly the eager drafter's tokens
    (the same kernels), round after round, catch-up widths 1..k+1, through a KV-cache growth."""
    from nemo_qwen3_next.config import qwen3_next_tiny_5m
    from nemo_qwen3_next.inference.speculative import MTPDrafter
    from nemo_qwen3_next.model import build_model, init_distributed

    init_distributed()
    torch.manual_seed(0)
    cfg = qwen3_next_tiny_5m(params_dtype=torch.bfloat16, bf16=True, mtp_num_layers=1, **TINY)
    m = build_model(cfg, backend="local").cuda().eval()
    eager, graphed = MTPDrafter(m), MTPDrafter(m)
    graphed.enable_cuda_graph()
    g = torch.Generator(device="cuda").manual_seed(1)
    H, k = cfg.hidden_size, 3
    tokens = torch.randint(0, 512, (80,), generator=g, device="cuda")
    hidden = torch.randn(80, H, generator=g, device="cuda", dtype=torch.bfloat16)
    n, m_ = 55, 54  # first call: the prompt's catch-up (eager in both); the 64-row cache grows at n + k > 64
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a capture fallback warns: fail on it
        for width in (None, 1, 4, 2, 1, 3, 4, 1):  # the catch-up over the last round's accepted + 1 positions
            if width is not None:
                m_, n = width, n + width
            h = hidden[n - 1 - m_:n - 1]
            want, got = eager.propose(tokens[:n], h, k), graphed.propose(tokens[:n], h, k)
            assert torch.equal(got, want), (n, m_, got.tolist(), want.tolist())
    assert any(v is not None for v in graphed._graphs.values())
