"""Generation speed of the reduced Qwen3-Next: prefill and decode tokens/s at batch 1, 8, 32.

Implementations, same random weights for ours (`bench_model.reduced_config`: 80B-A3B widths, 4 layers =
3 GDN + 1 gated attention, 64 experts top-10 + gated shared expert, vocab 151936; bf16):

* ``graph``: `inference.Decoder` with the decode step as a CUDA graph, fla kernels (chunked prefill,
  fused recurrent decode), the MoE's top-k permutation (no host syncs) into the grouped-GEMM experts;
* ``eager``: the same step launched op by op (no graph): its tokens must equal ``graph``'s exactly;
* ``plain``: our plain-PyTorch path (``linear_attention_backend="torch"``, the expert loop, Megatron's
  dispatcher, no graph): the reference;
* ``hf``: transformers' ``Qwen3NextForCausalLM.generate`` (greedy, ``min_new_tokens`` = max) in a child
  process (its own CUDA context), same config, its own random weights (only speed is compared).

Prompts: random ids (corpus ids once trained, below), ``--decode-prompt-len`` tokens each.
Prefill tokens/s = B·T / (prefill + first-token time); decode tokens/s = B·steps / time of the steps after
the first one (ours: the first step also captures the graph, reported as ``first_step_s``; HF: (time of n
tokens − time of 1 token) / (n − 1), medians of ``--decode-hf-rep`` calls).
One untimed warm-up generation per batch size first (kernel autotuning and compiles).

Acceptance (issue 12): decode at batch 1, ``graph`` >= 20x ``hf`` and >= 420 tokens/s, tokens = ``eager``.

``--speculative K[,K...]`` (issue 14) adds, at batch 1, greedy speculative decoding rows per K
(`inference.speculative`: K drafted tokens, one verify forward over K+1 positions, CUDA-graphed per width on
CUDA, GDN/KV rollback), one per ``--decode-draft``:

* ``replay``: drafts the ``graph`` (else ``eager``) row's own tokens, always right: the ceiling speculation reaches on this
  model (the cost of a verify forward vs a graphed one-token step);
* ``mtp``: the model's MTP layer (``--decode-mtp-layers``, default 1 with this drafter).

Their decode tokens/s = (n - 1) / time after the prefill (an untimed identical run first captures the verify
graphs, as the ``graph`` row's first step is untimed), with ``acceptance_rate`` (accepted / drafted),
``tokens_per_round`` and the agreement of the tokens with ``graph`` (bf16: the verify's k+1-row GEMMs may
round differently from the one-row step's, so a near-tie can flip a token and everything after it).

Random weights give flat logits (near-ties everywhere) and an MTP layer that drafts noise, so
``--decode-train-steps N`` first trains the model and its MTP layer (LM loss + ``mtp_loss_scaling_factor``
x MTP loss, the library's loss path) on a seeded synthetic stream, a sparse second-order Markov chain over
``--decode-train-symbols`` ids with an entropy floor of 0.435 nats (`bench_decode_train`); the prompts then
come from the same chain (held-out seed). The JSON's ``train`` holds the corpus, the shapes and both losses;
a training failure is recorded there and the rows still run on what was trained.

    PYTHONPATH=/tmp/site:$PWD python examples/bench_decode.py --decode-batches 1 --decode-impls graph,eager \
        --speculative 2,4 --decode-draft replay,mtp --decode-train-steps 300 --decode-new-tokens 128 \
        --decode-out benchmarks/results/h200_decode_speculative_trained.json --visualize

    PYTHONPATH=/tmp/site:$PWD python examples/bench_decode.py --decode-out benchmarks/results/h200_decode.json --visualize

`examples/benchmark.py --modules decode` calls `add_args(parser)` and `run(args)`; ``--config tiny`` is a
CPU smoke test (``--decode-impls eager,plain,hf``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
IMPLS = ("graph", "eager", "plain", "hf")


def add_args(ap):
    g = ap.add_argument_group("--modules decode (examples/bench_decode.py)")
    g.add_argument("--decode-batches", default="1,8,32")
    g.add_argument("--decode-prompt-len", type=int, default=128)
    g.add_argument("--decode-new-tokens", type=int, default=128, help="tokens per sequence for ours")
    g.add_argument("--decode-hf-new-tokens", type=int, default=32, help="HF decodes ~20 tokens/s: fewer tokens")
    g.add_argument("--decode-impls", default=",".join(IMPLS))
    g.add_argument("--decode-config", default="reduced", choices=["reduced", "tiny"])
    g.add_argument("--decode-out", default="benchmarks/results/decode.json")
    g.add_argument("--decode-hf-rep", type=int, default=3, help="HF: median of this many generate calls")
    g.add_argument("--decode-hf-timeout", type=float, default=300)
    g.add_argument("--decode-worker", default=None, help=argparse.SUPPRESS)
    g.add_argument("--decode-speculative", "--speculative", default=None, metavar="K[,K...]",
                   help="also time greedy speculative decoding with K drafted tokens (batch 1), for each K given")
    g.add_argument("--decode-draft", default="replay,mtp", help="drafters for --speculative: replay, mtp")
    g.add_argument("--decode-mtp-layers", type=int, default=None, metavar="N",
                   help="MTP layers of the model (default: 1 with --speculative and the mtp drafter, "
                        "else the config's)")
    g.add_argument("--decode-train-steps", type=int, default=0, metavar="N",
                   help="first train the model (and its MTP layer) N steps on a synthetic Markov stream")
    g.add_argument("--decode-train-batch", type=int, default=None, help="training batch (default: 2 on CUDA, 4 on CPU)")
    g.add_argument("--decode-train-seq", type=int, default=None,
                   help="training length (default: 4096 on CUDA, 64 on CPU)")
    g.add_argument("--decode-train-lr", type=float, default=1e-3)
    g.add_argument("--decode-train-symbols", type=int, default=None,
                   help="token ids the corpus uses (default: 1024, at most vocab / 2)")


def our_config(name: str, **overrides):
    if name == "tiny":
        from nemo_qwen3_next.config import qwen3_next_tiny_5m

        return qwen3_next_tiny_5m(**overrides)
    sys.path.insert(0, HERE)
    import bench_model  # the sibling script: the reduced model of --modules model

    return bench_model.reduced_config(**overrides)


def hf_config(name: str):
    """transformers' config of the same model (the reduced one as `bench_model` builds it for HF)."""
    from transformers import Qwen3NextConfig

    if name == "tiny":
        return Qwen3NextConfig(**our_config(name).to_hf_dict())
    import bench_model  # noqa: F401 -- our_config put the sibling on sys.path

    our_config(name)
    return bench_model.hf_config()


def _device_dtype(name: str):
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def _prompts(B: int, T: int, vocab: int, device):
    g = torch.Generator().manual_seed(B)
    return torch.randint(0, vocab, (B, T), generator=g).to(device)


def _build(cfg_name: str, plain: bool, dtype, device, state=None, mtp_layers=None):
    """Our model (kernel path, or the plain-torch one: torch GDN ops and the expert loop); ``mtp_layers``
    (not None) sets the config's ``mtp_num_layers`` (0: none)."""
    import nemo_qwen3_next as nq

    nq.init_single_process()
    over = dict(params_dtype=dtype, bf16=dtype == torch.bfloat16, use_cpu_initialization=device.type == "cpu")
    if mtp_layers is not None:
        over["mtp_num_layers"] = mtp_layers or None
    if plain:
        over.update(linear_attention_backend="torch", moe_fast_permute=False)  # Megatron's dispatcher
    old = os.environ.get("QWEN3_NEXT_MOE_EXPERTS")
    if plain:
        os.environ["QWEN3_NEXT_MOE_EXPERTS"] = "sequential"  # read when the experts are built
    try:
        torch.manual_seed(0)
        model = nq.build_model(our_config(cfg_name, **over), backend="local").to(device).eval()
    finally:
        if plain:
            os.environ.pop("QWEN3_NEXT_MOE_EXPERTS") if old is None else os.environ.update(QWEN3_NEXT_MOE_EXPERTS=old)
    if state is not None:
        model.load_state_dict(state)
    return model


@torch.no_grad()
def time_ours(model, ids, n: int, impl: str):
    """Greedy generation of n tokens with `inference.Decoder`; times and the tokens."""
    from nemo_qwen3_next.inference import Decoder

    cuda = ids.is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    B, T = ids.shape
    dec = Decoder(model, B, T + n, cuda_graph=impl == "graph", sync_free=impl != "plain")
    sync()
    t0 = time.perf_counter()
    tok = dec.prefill(list(ids)).argmax(-1)
    sync()
    t1 = time.perf_counter()
    out = [tok]
    tok = dec.step(tok).argmax(-1)  # the first step (captures the graph)
    out.append(tok)
    sync()
    t2 = time.perf_counter()
    for _ in range(n - 2):
        tok = dec.step(tok).argmax(-1)
        out.append(tok)
    sync()
    t3 = time.perf_counter()
    return dict(prefill_s=t1 - t0, first_step_s=t2 - t1, decode_s=t3 - t2, steps=n - 2), torch.stack(out, 1)


class ReplayDrafter:
    """Proposes a known continuation (``tokens [n]`` of the ``graph`` row), sliced on the device."""

    needs_hidden = False

    def __init__(self, prompt_len: int, continuation: torch.Tensor):
        self.T, self.cont = prompt_len, continuation

    def propose(self, tokens, hidden, k):
        i = tokens.numel() - self.T
        return torch.cat([self.cont[i:i + k], self.cont[:k]])[:k]  # past the end: anything


@torch.no_grad()
def time_speculative(model, ids, n: int, k: int, draft, warm: dict = None):
    """Greedy speculative generation of n tokens at batch 1; times, the tokens and the stats.

    ``warm`` (a dict, kept by the caller between calls of the same k and drafter) carries the Decoder, its
    verify graphs (one per width k+1, and the narrower ones of the last rounds) and the drafter from a first,
    untimed call to the timed one, so that graph capture is outside the timing as in the ``graph`` row. The
    graphs hold the Decoder's state tensors, which a new prefill rewrites in place: they stay valid.
    """
    from nemo_qwen3_next.inference import Decoder
    from nemo_qwen3_next.inference.speculative import SpeculativeStream, make_drafter

    warm = {} if warm is None else warm
    cuda = ids.is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    T = ids.shape[1]
    if not warm:  # as `inference.stream` builds it (TP = EP = 1 here)
        warm.update(dec=Decoder(model, 1, T + n, cuda_graph=False, sync_free=cuda), graphs={},
                    drafter=make_drafter(model, draft))
    sync()
    t0 = time.perf_counter()
    # shared: widths captured by an earlier call are replayed, new ones added
    it = SpeculativeStream(warm["dec"], ids[0], n, k, warm["drafter"], cuda_graph=cuda, graphs=warm["graphs"])
    out = [next(it)]
    sync()
    t1 = time.perf_counter()
    out += list(it)
    sync()
    t2 = time.perf_counter()
    t = dict(prefill_s=t1 - t0, decode_s=t2 - t1, steps=n - 1)
    return t, torch.cat(out)[None], it.stats


def k_list(value) -> list:
    """``--speculative``: ``4`` or ``2,4`` (an int from a caller also works) -> ``[2, 4]``."""
    if value is None:
        return []
    try:
        ks = [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        raise SystemExit(f"bench_decode: --speculative {value!r}: give drafted-token counts >= 1, e.g. 4 or 2,4")
    return ks


def run_speculative(args, model, ids, ref_tokens, ref, rows, save):
    """The ``--speculative`` rows (batch 1) for each K and drafter, next to the plain decode ``ref``
    (``graph``, else ``eager``) whose tokens ``ref_tokens`` they must reproduce."""
    T, n = ids.shape[1], args.decode_new_tokens
    for k in k_list(args.decode_speculative):
        for name in [d for d in args.decode_draft.split(",") if d]:
            impl = f"spec_{name}_k{k}"
            try:
                if name == "replay":
                    if ref_tokens is None:
                        raise ValueError("draft 'replay' replays the plain decode's tokens: keep 'graph' or 'eager' "
                                         "in --decode-impls")
                    draft = ReplayDrafter(T, ref_tokens[0])
                elif name == "mtp":
                    draft = "mtp"
                else:
                    raise ValueError(f"--decode-draft {name!r}: use replay or mtp")
                warm = {}
                t0 = time.perf_counter()
                time_speculative(model, ids, n, k, draft, warm)  # warm-up: the same widths get captured
                warm_s = time.perf_counter() - t0
                t, tokens, st = time_speculative(model, ids, n, k, draft, warm)
                extra = dict(k=k, acceptance_rate=round(st.acceptance_rate, 4),
                             tokens_per_round=round(st.tokens_per_round, 3), rounds=st.rounds,
                             warmup_s=round(warm_s, 3), verify_graphs=sorted(warm["graphs"]))
                if ref_tokens is not None:
                    extra[f"tokens_equal_{ref}"] = bool(torch.equal(tokens, ref_tokens))
                    extra[f"token_agreement_with_{ref}"] = round((tokens == ref_tokens).float().mean().item(), 4)
                r = _row(impl, 1, T, n, t, extra)
                del warm
            except Exception as e:  # noqa: BLE001 -- one failing row must not lose the others
                r = dict(impl=impl, B=1, k=k, error=f"{type(e).__name__}: {e}"[:500])
            rows.append(r)
            print(json.dumps(r), flush=True)
            save()


def _row(impl, B, T, n, t, extra=None):
    r = dict(impl=impl, B=B, prompt_len=T, new_tokens=n, prefill_s=round(t["prefill_s"], 4),
             prefill_tokens_per_s=round(B * T / t["prefill_s"], 1),
             decode_tokens_per_s=round(B * t["steps"] / t["decode_s"], 1),
             decode_ms_per_step=round(t["decode_s"] / t["steps"] * 1e3, 3))
    if "first_step_s" in t:
        r["first_step_s"] = round(t["first_step_s"], 3)
    r.update(extra or {})
    return r


def mtp_layers(args):
    """``--decode-mtp-layers``, or 1 when the ``mtp`` drafter is asked for, else None (the config's)."""
    if args.decode_mtp_layers is not None:
        if args.decode_mtp_layers < 0:
            raise SystemExit(f"bench_decode: --decode-mtp-layers {args.decode_mtp_layers}: use 0 (none) or more")
        return args.decode_mtp_layers
    drafts = [d for d in args.decode_draft.split(",") if d]
    return 1 if args.decode_speculative is not None and "mtp" in drafts else None


def train_model(args, model, result, save):
    """``--decode-train-steps``: train on the synthetic corpus (`bench_decode_train`); the corpus, or None.
    A failure is recorded in ``result["train"]["error"]`` (and saved) and the decode rows still run."""
    sys.path.insert(0, HERE)
    import bench_decode_train as bt

    cuda = next(model.parameters()).is_cuda
    vocab = model.config.vocab_size
    symbols = args.decode_train_symbols or min(1024, vocab // 2)
    info = result["train"] = {}
    try:
        corpus = bt.MarkovCorpus(vocab, symbols=symbols, seed=0)
    except ValueError as e:
        raise SystemExit(f"bench_decode: {e}")
    try:
        bt.train(model, corpus, args.decode_train_steps, args.decode_train_batch or (2 if cuda else 4),
                 args.decode_train_seq or (4096 if cuda else 64), info, lr=args.decode_train_lr)
    except Exception as e:  # noqa: BLE001 -- keep what was measured; decode what was trained
        info["error"] = f"{type(e).__name__}: {e}"[:500]
        print(f"training failed after {info.get('completed_steps', 0)} steps: {info['error']}", flush=True)
    save()
    return corpus


def run_ours(args, impls, result, save):
    from nemo_qwen3_next.ops import usage

    rows = result["rows"]
    device, dtype = _device_dtype(args.decode_config)
    model = _build(args.decode_config, False, dtype, device, mtp_layers=result["mtp_layers"])
    corpus = train_model(args, model, result, save) if args.decode_train_steps > 0 else None
    plain = (_build(args.decode_config, True, dtype, device, model.state_dict(), mtp_layers=result["mtp_layers"])
             if "plain" in impls else None)
    T, n = args.decode_prompt_len, args.decode_new_tokens
    for B in args.batch_list:
        # trained: prompts from the corpus (held-out seed), so the model is on the distribution it learnt
        if corpus is not None:
            ids = corpus.sample(B, T, seed=10_000 + B).to(device)
        else:
            ids = _prompts(B, T, model.config.vocab_size, device)
        tokens = {}
        for impl in [i for i in ("graph", "eager", "plain") if i in impls]:
            m = plain if impl == "plain" else model
            try:
                time_ours(m, ids, 4, impl)  # warm-up
                usage.reset()
                t, tokens[impl] = time_ours(m, ids, n, impl)
                extra = dict(kernels=usage.kernels_used())
                if corpus is not None:
                    extra["greedy_follows_chain"] = round(corpus.dominant_rate(ids, tokens[impl]), 4)
                if device.type == "cuda":
                    extra["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
                if impl != "graph" and "graph" in tokens:  # bitwise for eager (same kernels), bf16 drift for plain
                    extra["tokens_equal_graph"] = bool(torch.equal(tokens[impl], tokens["graph"]))
                    extra["token_agreement_with_graph"] = round((tokens[impl] == tokens["graph"]).float().mean().item(), 4)
                r = _row(impl, B, T, n, t, extra)
            except Exception as e:  # noqa: BLE001 -- one failing row must not lose the others
                r = dict(impl=impl, B=B, error=f"{type(e).__name__}: {e}"[:500])
            rows.append(r)
            print(json.dumps(r), flush=True)
            save()
        if args.decode_speculative is not None and B == 1:
            ref = "graph" if "graph" in tokens else "eager"
            run_speculative(args, model, ids, tokens.get(ref), ref, rows, save)


def hf_worker(args):
    """Child process: HF generate on the same config; prints one line ``HF_ROW {...}`` per batch size."""
    import transformers
    from transformers import Qwen3NextForCausalLM

    device, dtype = _device_dtype(args.decode_config)
    cfg = hf_config(args.decode_config)
    torch.manual_seed(0)
    m = Qwen3NextForCausalLM(cfg).to(device, dtype).eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    T, n = args.decode_prompt_len, args.decode_hf_new_tokens
    rows = []

    def gen(ids, k):
        sync()
        t = time.perf_counter()
        m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k, do_sample=False,
                   pad_token_id=0)
        sync()
        return time.perf_counter() - t

    for B in args.batch_list:
        ids = _prompts(B, T, cfg.vocab_size, device)
        try:
            gen(ids, 2)  # warm-up
            one = statistics.median(gen(ids, 1) for _ in range(args.decode_hf_rep))
            full = statistics.median(gen(ids, n) for _ in range(args.decode_hf_rep))
            t = dict(prefill_s=one, decode_s=full - one, steps=n - 1)
            rows.append(_row("hf", B, T, n, t, dict(version=f"transformers-{transformers.__version__}")))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(impl="hf", B=B, error=f"{type(e).__name__}: {e}"[:500]))
        print("HF_ROW " + json.dumps(rows[-1]), flush=True)  # one line per row: a time limit keeps the done ones


def run_hf_child(args):
    cmd = [sys.executable, os.path.abspath(__file__), "--decode-worker", "hf", "--decode-config", args.decode_config,
           "--decode-batches", args.decode_batches, "--decode-prompt-len", str(args.decode_prompt_len),
           "--decode-hf-new-tokens", str(args.decode_hf_new_tokens), "--decode-hf-rep", str(args.decode_hf_rep)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.decode_hf_timeout)
        out, err = p.stdout, f"rc={p.returncode}: {p.stderr[-1500:]}"
    except subprocess.TimeoutExpired as e:
        out, err = e.stdout or "", f"timed out after {args.decode_hf_timeout} s"
        out = out.decode() if isinstance(out, bytes) else out
    rows = [json.loads(line[len("HF_ROW "):]) for line in out.splitlines() if line.startswith("HF_ROW ")]
    done = {r["B"] for r in rows}
    return rows + [dict(impl="hf", B=B, error=err) for B in args.batch_list if B not in done]


def acceptance(rows):
    """Issue 12's GPU targets at batch 1, and issue 14's speculative summary, from the rows."""
    get = lambda impl: next((r for r in rows if r.get("impl") == impl and r.get("B") == 1 and "error" not in r), None)  # noqa: E731
    ours, hf, eager = get("graph"), get("hf"), get("eager")
    spec = speculative_summary(rows, ours or eager, "graph" if ours else "eager")
    if not ours:
        return dict(speculative=spec) if spec else {}
    a = dict(decode_b1_graph=ours["decode_tokens_per_s"], target_tokens_per_s=420)
    if hf:
        a.update(decode_b1_hf=hf["decode_tokens_per_s"], speedup_vs_hf=round(ours["decode_tokens_per_s"] / hf["decode_tokens_per_s"], 1),
                 target_speedup=20)
    if eager:
        a["tokens_equal_eager"] = eager.get("tokens_equal_graph")
    a["met"] = bool(a["decode_b1_graph"] >= 420 and a.get("speedup_vs_hf", 0) >= 20 and a.get("tokens_equal_eager"))
    if spec:
        a["speculative"] = spec
    return a


def speculative_summary(rows, base, ref):
    """Plain decode tokens/s (``ref``: graph, else eager), the best speculative row and its speedup, the
    ``mtp`` drafter's acceptance per K, and whether every speculative row's tokens equal plain greedy's."""
    spec = [r for r in rows if r.get("impl", "").startswith("spec_") and "error" not in r]
    if not spec:
        return {}
    speedup = lambda r: round(r["decode_tokens_per_s"] / base["decode_tokens_per_s"], 3) if base else None  # noqa: E731
    per_row = {r["impl"]: dict(decode_tokens_per_s=r["decode_tokens_per_s"], acceptance_rate=r["acceptance_rate"],
                               tokens_per_round=r["tokens_per_round"], speedup=speedup(r)) for r in spec}
    best = max(spec, key=lambda r: r["decode_tokens_per_s"])
    equal = [r.get(f"tokens_equal_{ref}") for r in spec]
    return dict(plain=ref, plain_decode_tokens_per_s=base["decode_tokens_per_s"] if base else None,
                best=best["impl"], best_decode_tokens_per_s=best["decode_tokens_per_s"],
                best_speedup=per_row[best["impl"]]["speedup"],
                mtp_acceptance_rate={str(r["k"]): r["acceptance_rate"] for r in spec
                                     if r["impl"].startswith("spec_mtp_")},
                tokens_equal_plain_greedy=None if None in equal else all(equal), rows=per_row)


def visualize(result, prefix):
    """PNG: prefill and decode tokens/s per batch size and implementation (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "error" not in r]
    impls = [i for i in IMPLS if any(r["impl"] == i for r in rows)]
    impls += sorted({r["impl"] for r in rows if r["impl"].startswith("spec_")})
    batches = sorted({r["B"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    w = 0.8 / max(len(impls), 1)
    for ax, key, title in ((axes[0], "prefill_tokens_per_s", "prefill"), (axes[1], "decode_tokens_per_s", "decode")):
        for i, impl in enumerate(impls):
            vals = [next((r[key] for r in rows if r["impl"] == impl and r["B"] == b), 0) for b in batches]
            ax.bar([j + i * w for j in range(len(batches))], vals, w, label=impl)
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(batches))], [f"B={b}" for b in batches])
        ax.set_yscale("log")
        ax.set_ylabel("tokens/s (higher is better)")
        ax.set_title(f"{title}, prompt {result['prompt_len']} tokens")
        ax.legend(fontsize=8)
    trained = f", trained {result['train'].get('completed_steps')} steps" if result.get("train") else ""
    fig.suptitle(f"Qwen3-Next ({result['config']} model{trained}) generation on {result['device']}, bf16 on CUDA")
    fig.tight_layout()
    path = prefix + "_decode.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args):
    """Measure, write ``args.decode_out`` (JSON) after every row, and a PNG beside it with ``args.visualize``."""
    args.batch_list = [int(b) for b in args.decode_batches.split(",") if b]
    if args.decode_worker:
        return hf_worker(args)
    impls = [i for i in args.decode_impls.split(",") if i]
    unknown = set(impls) - set(IMPLS)
    if unknown:
        raise SystemExit(f"bench_decode: unknown --decode-impls {sorted(unknown)}; use {','.join(IMPLS)}")
    if "graph" in impls and not torch.cuda.is_available():
        raise SystemExit("bench_decode: impl 'graph' needs CUDA; use --decode-impls eager,plain,hf on CPU")
    k_list(args.decode_speculative)  # bad K: one line, before anything runs
    if args.decode_train_steps < 0:
        raise SystemExit(f"bench_decode: --decode-train-steps {args.decode_train_steps}: use 0 (random weights) "
                         f"or more")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = dict(device=device, config=args.decode_config, prompt_len=args.decode_prompt_len,
                  torch=torch.__version__, mtp_layers=mtp_layers(args),
                  prompts="corpus (held-out seed)" if args.decode_train_steps > 0 else "uniform random ids", rows=[])
    os.makedirs(os.path.dirname(os.path.abspath(args.decode_out)), exist_ok=True)

    def save():
        result["acceptance"] = acceptance(result["rows"])
        with open(args.decode_out, "w") as f:
            json.dump(result, f, indent=1)

    if "hf" in impls:  # first: the anchor of the acceptance must not be lost to a time limit
        for r in run_hf_child(args):
            result["rows"].append(r)
            print(json.dumps(r), flush=True)
        save()
    try:
        run_ours(args, impls, result, save)
    except BaseException as e:  # a build failure or an interrupt: the JSON keeps the error and what was done
        result["error"] = f"{type(e).__name__}: {e}"[:500]
        save()
        raise
    save()
    print("acceptance: " + json.dumps(result["acceptance"]), flush=True)
    if getattr(args, "visualize", False):
        print("wrote " + visualize(result, os.path.splitext(args.decode_out)[0]), flush=True)
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_args(ap)
    ap.add_argument("--visualize", action="store_true", help="also write a PNG next to the JSON")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    main()
