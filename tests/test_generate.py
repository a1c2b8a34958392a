"""Generation (`nemo_qwen3_next.inference`) against Hugging Face's `generate` and our own full forward.

HF transformers' `Qwen3NextForCausalLM.generate(do_sample=False)` is the independent reference: same
random weights through `load_hf`, fp32 on CPU, a left-padded batch of two prompts of different lengths.
"""

import os
import subprocess
import sys

import pytest
import torch

from nemo_qwen3_next import generate, load_hf, stream
from nemo_qwen3_next.inference import Decoder, filter_logits, next_tokens
from nemo_qwen3_next.inference.forward import moe_forward_sync_free
from nemo_qwen3_next.ops import causal_conv1d, causal_conv1d_update
from nemo_qwen3_next.testing import random_hf_model, tiny_hf_config

L, F_ = "linear_attention", "full_attention"
VARIANTS = {
    "hybrid": {},  # both kinds, MoE + gated shared expert, a dense-MLP layer (mlp_only_layers=[1])
    "all_linear": dict(layer_types=[L] * 4),
    "all_full": dict(layer_types=[F_] * 4),
    "mqa": dict(num_key_value_heads=1),
    "tied_dense_only": dict(num_experts=0, tie_word_embeddings=True),  # the LM head reads the embedding
}
WORKER = os.path.join(os.path.dirname(__file__), "generate_tp_worker.py")


@pytest.fixture(scope="module", autouse=True)
def pretrain_run(tmp_path_factory):
    """`test_cli_on_a_pretrain_run`'s training run, started with this module's first test so that its ~15 s
    on one core overlap the in-process tests on the other: (process, directory with run/, out, err)."""
    d = tmp_path_factory.mktemp("pretrain_run")
    cmd = [sys.executable, "examples/pretrain.py", f"run_dir={d / 'run'}", f"data.cache_dir={d / 'data'}",
           "trainer.max_steps=1", "checkpoint.every_n_steps=1", "trainer.val_check_interval=1000",
           "optim.warmup_steps=0", "data.micro_batch_size=2", "data.global_batch_size=2", "data.seq_length=64",
           "data.embedded_max_bytes=200000"]
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    with open(d / "out", "w") as out, open(d / "err", "w") as err:
        proc = subprocess.Popen(cmd, cwd=os.path.join(os.path.dirname(__file__), ".."), stdout=out, stderr=err,
                                env=env)
    yield proc, d
    if proc.poll() is None:  # its test did not run
        proc.kill()
    proc.wait()


def _pair(variant="hybrid"):
    hf = random_hf_model(tiny_hf_config(**VARIANTS[variant]), seed=1)
    return hf, load_hf(hf, linear_attention_chunk_size=16)


def _left_padded(seed=0, lengths=(13, 6), vocab=256):
    """Two prompts of different lengths, left-padded (pad id 0), and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = torch.randint(1, vocab, (n,), generator=g)
        mask[b, T - n:] = 1
    return ids, mask


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_matches_hf_generate(variant):
    hf, ours = _pair(variant)
    ids, mask = _left_padded()
    # transformers 4.57's Qwen3NextDynamicCache needs both layer kinds (IndexError / ValueError otherwise):
    # for all-linear and all-full models HF generates without a cache, a full forward per token.
    use_cache = variant not in ("all_linear", "all_full")
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=48, do_sample=False, pad_token_id=0,
                          use_cache=use_cache)
    out = generate(ours, ids, 48, attention_mask=mask)
    assert out.shape == ref.shape == (2, ids.shape[1] + 48)
    assert torch.equal(out, ref), (out[:, ids.shape[1]:], ref[:, ids.shape[1]:])


def test_eos_stops_each_sequence_like_hf():
    hf, ours = _pair()
    ids, mask = _left_padded()
    free = generate(ours, ids, 24, attention_mask=mask)[:, ids.shape[1]:]
    # an EOS id that sequence 0 emits early and sequence 1 later (or never): per-sequence stops
    eos = next(int(t) for t in free[0, 2:] if not (free[1, :6] == t).any())
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                          eos_token_id=eos, pad_token_id=eos)
    out = generate(ours, ids, 24, attention_mask=mask, eos_token_id=eos)
    assert torch.equal(out, ref)
    assert (out[0, ids.shape[1]:] == eos).sum() >= 2  # sequence 0 stopped and was padded


@pytest.mark.parametrize("sync_free", [False, True], ids=["dispatcher", "sync_free_moe"])
def test_decode_logits_equal_full_forward(sync_free):
    """Each decode step's logits = the last-position logits of a full forward over the same prefix."""
    _, ours = _pair()
    ids, mask = _left_padded(seed=3, lengths=(9, 5))
    prompts = [ids[b][mask[b].bool()] for b in range(2)]
    dec = Decoder(ours, 2, 9 + 6, sync_free=sync_free)
    logits = dec.prefill(prompts)
    seqs = [p.clone() for p in prompts]
    with torch.no_grad():
        for step in range(6):
            for b in range(2):
                full = ours(seqs[b][None], torch.arange(seqs[b].numel())[None], None)[0, -1]
                err = (logits[b] - full).abs().max().item()
                assert err <= 1e-5, (step, b, err)
            tok = logits.argmax(-1)
            seqs = [torch.cat([s, t[None]]) for s, t in zip(seqs, tok)]
            logits = dec.step(tok)


@pytest.mark.parametrize("experts", ["sequential", "grouped_mm"])
def test_sync_free_moe_equals_megatron_dispatcher(experts, monkeypatch):
    """Both sync-free forms (the layer's top-k permutation + grouped experts; every expert weighted) =
    Megatron's dispatcher (`moe_fast_permute=False`) on the same weights."""
    if experts == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("needs torch._grouped_mm")
    monkeypatch.setenv("QWEN3_NEXT_MOE_EXPERTS", experts)
    hf = random_hf_model(tiny_hf_config(), seed=1)
    mlp = load_hf(hf, linear_attention_chunk_size=16).decoder.layers[0].mlp
    ref_mlp = load_hf(hf, linear_attention_chunk_size=16, moe_fast_permute=False).decoder.layers[0].mlp
    x = torch.randn(3, 2, hf.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, _ = ref_mlp(x)
        out, _ = moe_forward_sync_free(mlp, x)
    assert (out - ref).abs().max().item() <= 1e-6


@pytest.mark.parametrize("experts", ["sequential", "grouped_mm"])
def test_sync_free_decode_step_reads_no_tensor_values_on_the_host(experts, monkeypatch):
    """What a CUDA graph needs, checked on CPU: the whole decode step runs on meta tensors (which have no
    data, so any .item() / .tolist() / bool() raises)."""
    if experts == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("needs torch._grouped_mm")
    monkeypatch.setenv("QWEN3_NEXT_MOE_EXPERTS", experts)
    _, ours = _pair()
    meta = ours.to("meta", torch.bfloat16 if experts == "grouped_mm" else torch.float32)  # grouped GEMMs: bf16

    def step(sync_free):
        dec = Decoder(meta, 2, 16, sync_free=sync_free)
        dec.rope, dec.positions = dec.rope.to("meta"), torch.tensor([[3, 5]], device="meta")
        return dec.step(torch.tensor([1, 2], device="meta"))

    assert step(True).shape == (2, ours.config.vocab_size)
    if experts == "sequential":  # the control: the expert loop splits by counts read on the host
        with pytest.raises(NotImplementedError, match="meta"):
            step(False)


def test_conv_update_equals_conv_with_state():
    g = torch.Generator().manual_seed(0)
    B, D, W, T = 2, 6, 4, 5
    x, w = torch.randn(B, T, D, generator=g), torch.randn(D, W, generator=g)
    bias, h0 = torch.randn(D, generator=g), torch.randn(B, D, W - 1, generator=g)
    ref, final = causal_conv1d(x, w, bias, initial_state=h0, output_final_state=True, backend="torch")
    state = h0.clone()
    ys = [causal_conv1d_update(x[:, t], state, w, bias) for t in range(T)]
    assert (torch.stack(ys, 1) - ref).abs().max().item() <= 1e-6
    assert torch.allclose(state, final)


def test_tp2_generation_equals_tp1(tmp_path):
    out = tmp_path / "tp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", WORKER, str(out)]
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = torch.load(out)
    _, ours = _pair()
    ids, mask = _left_padded()
    assert torch.equal(got["greedy"], generate(ours, ids, 16, attention_mask=mask))
    assert torch.equal(got["sampled"], generate(ours, ids, 16, attention_mask=mask, temperature=1.0, top_k=20, seed=7))


# ----------------------------------------------------------------------------- sampling
def test_sampling_with_a_seed_is_reproducible():
    _, ours = _pair()
    ids, mask = _left_padded()
    kw = dict(attention_mask=mask, temperature=0.9, top_k=50, top_p=0.9)
    a = generate(ours, ids, 12, seed=11, **kw)
    assert torch.equal(a, generate(ours, ids, 12, seed=11, **kw))
    assert not torch.equal(a, generate(ours, ids, 12, seed=12, **kw))


LOGITS = torch.tensor([2.0, -1.0, 0.5, 3.0, 0.25, -2.0, 1.0, 0.0])


def test_top_k_keeps_the_k_largest_logits():
    for k in range(1, 9):
        want = torch.zeros(8, dtype=torch.bool)
        want[LOGITS.argsort(descending=True)[:k]] = True
        assert torch.equal(torch.isfinite(filter_logits(LOGITS, top_k=k)), want), k
    tied = torch.isfinite(filter_logits(torch.tensor([1.0, 2.0, 2.0, 0.0]), top_k=1))
    assert tied.tolist() == [False, True, True, False]  # a tie at the k-th logit is kept


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = LOGITS.softmax(-1)
    order = probs.argsort(descending=True)
    for p in (0.05, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0):
        kept = torch.isfinite(filter_logits(LOGITS, top_p=p))
        # definition: the n most probable tokens, n the smallest with cumulative probability >= p
        n = int((probs[order].cumsum(0) < p).sum()) + 1
        want = torch.zeros_like(kept)
        want[order[: min(n, 8)]] = True
        assert torch.equal(kept, want), p


def test_sampling_draws_from_the_filtered_distribution():
    g = torch.Generator().manual_seed(0)
    n = 20000
    draws = next_tokens(LOGITS.expand(n, -1), temperature=0.7, top_k=4, generator=g)
    want = filter_logits(LOGITS / 0.7, top_k=4).softmax(-1)
    freq = torch.bincount(draws, minlength=8).float() / n
    assert (freq[want == 0] == 0).all()
    assert (freq - want).abs().max() <= 0.015  # ~4 standard errors at n = 20000


# ----------------------------------------------------------------------------- bad input, one line each
def _one_line_error(fn, match):
    with pytest.raises(ValueError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def test_bad_input_one_line_each():
    _, ours = _pair()
    limit = ours.config.max_position_embeddings
    _one_line_error(lambda: generate(ours, torch.ones(1, limit + 1, dtype=torch.long), 1), "max_position_embeddings")
    _one_line_error(lambda: generate(ours, torch.ones(1, limit - 2, dtype=torch.long), 8), "max_position_embeddings")
    _one_line_error(lambda: generate(ours, torch.zeros(2, 0, dtype=torch.long), 4), "empty prompt")
    ids, mask = _left_padded()
    mask[1] = 0
    _one_line_error(lambda: generate(ours, ids, 4, attention_mask=mask), "prompt 1 is empty")
    for p in (0.0, -0.1, 1.5):
        _one_line_error(lambda: generate(ours, ids[:1], 4, temperature=1.0, top_p=p), r"top_p .* \(0, 1\]")
    _one_line_error(lambda: stream(ours, ids[:1], 4, temperature=1.0, top_p=0.0), "top_p")  # at the call


# ----------------------------------------------------------------------------- CLI
def _byte_level_tokenizer(path):
    """A transformers tokenizer with one token per UTF-8 byte (ids 0..255), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    vocab = {ch: i for i, ch in sorted((b, c) for b, c in bytes_to_unicode().items())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)


def test_cli_streams_greedy_text_from_a_hf_directory(tmp_path, capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    import generate as cli

    hf = random_hf_model(tiny_hf_config(), seed=1)
    hf.save_pretrained(tmp_path)
    _byte_level_tokenizer(tmp_path)
    assert cli.main(["--checkpoint", str(tmp_path), "--prompt", "héllo", "--max-new-tokens", "10"]) == 0
    out = capsys.readouterr()
    from transformers import AutoTokenizer

    prompt = torch.tensor([list("héllo".encode())])
    new = generate(load_hf(hf), prompt, 10)[0, prompt.shape[1]:]
    assert out.out == "héllo" + AutoTokenizer.from_pretrained(tmp_path).decode(new.tolist()) + "\n"
    assert "prefill: 6 tokens" in out.err and "decode: 9 tokens" in out.err
    assert cli.main(["--checkpoint", str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown checkpoint layout" in err and "\n" not in err


def test_cli_on_a_pretrain_run(pretrain_run, capsys):
    """`examples/pretrain.py` writes weights only (no NeMo context): the CLI rebuilds the model and the byte
    tokenizer from the run's own overrides and loads the newest checkpoint of the run directory."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    import generate as cli

    proc, d = pretrain_run
    assert proc.wait(timeout=300) == 0, (d / "out").read_text()[-2000:] + (d / "err").read_text()[-2000:]
    run_dir = d / "run"
    assert cli.main(["--checkpoint", str(run_dir), "--prompt", "def f(", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def f(") and "prefill: 6 tokens" in out.err, (out.out, out.err)
