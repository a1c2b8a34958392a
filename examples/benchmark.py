"""Speed and numerics of Qwen3-Next layers at 80B-A3B widths, on one GPU (bf16).

Times forward, backward and forward+backward of

* ``gdn``:   the Gated DeltaNet layer, side by side: ``ours`` (fused CUDA path; FlashQLA's chunk kernel
  when installed), ``ours-graphs`` (the same with ``config.mixer_cuda_graphs``: forward+backward replayed
  from CUDA graphs; also for ``attn``/``layer``), ``ours-fla`` (the same with fla's chunk kernel), ``ours-triton`` / ``ours-graphs-triton`` (forcing our Triton conv and gated norm, the default), ``ours-vendor`` / ``ours-graphs-vendor`` (fla's conv and norm instead, ``QWEN3_NEXT_OWN_KERNELS=0``), ``ours-qknorm`` / ``ours-graphs-qknorm`` (forcing the q/k L2-norm inside our conv, ``QWEN3_NEXT_FUSED_QK_NORM=1``, the default), ``ours-noqknorm`` / ``ours-graphs-noqknorm`` (the chunk kernel's own q/k L2-norm instead, ``=0``), ``ours-fivegemm`` / ``ours-graphs-fivegemm`` (in_proj as five GEMMs on the weight pieces, ``QWEN3_NEXT_ONE_IN_PROJ_GEMM=0``), ``ours-recomputeh`` / ``ours-graphs-recomputeh`` (FlashQLA's chunk states recomputed in backward, ``QWEN3_NEXT_GDN_KEEP_STATES=0``), ``hf`` (transformers'
  ``Qwen3NextGatedDeltaNet``), ``mcore`` (megatron-core 0.16.1's ``GatedDeltaNet`` with local linears,
  run in a child process with that version first on ``PYTHONPATH``: ``--anchor-path``) and ``ref``
  (our plain-torch reference path, only up to ``--ref-max-tokens``);
* ``attn``:  our gated full-attention layer (SDPA core);
* ``moe``:   the MoE block (512 experts, top-10, gated shared expert; local ``SequentialMLP``);
* ``layer``: a whole decoder layer (RMSNorm + GDN + RMSNorm + MoE, residuals),
* ``model``: a whole reduced model's training step, ours vs HF (``examples/bench_model.py`` says how),
* ``decode``: prefill and decode tokens/s of the reduced model, ours vs HF ``generate`` (``examples/bench_decode.py``),

over a ladder of (B, T), and reports ms, tokens/s and achieved TFLOP/s (FLOP model below).
``--check`` compares the fused GDN path in bf16 with the fp32 reference path on the same weights
(forward and all gradients). ``--visualize`` writes PNG plots next to the JSON.

FLOP model (forward; backward counted as 2x forward): matmuls ``2·in·out`` per token; GDN chunk
kernel ``Hv·(6·Dk·Dv + 2·C·(Dk + Dv))`` per token (C = 64); causal attention ``4·(T/2)·d·Hq`` per
token; MoE ``router + (topk + shared)·3·2·H·F``.

Example (what produced ``benchmarks/results/``)::

    python examples/benchmark.py --modules gdn,attn,moe,layer --impls ours,hf,mcore,ref \\
        --anchor-path /tmp/site-anchor --check --out benchmarks/results/h200.json --visualize
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import bench_decode  # the sibling scripts: --modules decode
import bench_model  # --modules model

DEFAULT_SHAPES = "1x1024,1x2048,1x4096,1x8192,1x16384,1x32768,1x65536,4x4096"
PASSES = ("fwd", "bwd", "fwdbwd")

# Qwen3-Next-80B-A3B widths
H, HK, HV, DK, DV, W = 2048, 16, 32, 128, 128, 4
NQ, NKV, HD = 16, 2, 256
E, TOPK, FF = 512, 10, 512


# ----------------------------------------------------------------------------- FLOP model
def flops_fwd(module: str, T: int) -> float:
    """Forward FLOPs per token."""
    gdn_proj = 2 * H * HK * (2 * DK + 2 * (HV // HK) * DV + 2 * (HV // HK)) + 2 * HV * DV * H
    gdn = gdn_proj + HV * (6 * DK * DV + 2 * 64 * (DK + DV))
    attn = 2 * H * (NQ * HD * 2 + 2 * NKV * HD) + 2 * NQ * HD * H + 4 * (T / 2) * HD * NQ
    moe = 2 * H * E + (TOPK + 1) * 3 * 2 * H * FF
    return {"gdn": gdn, "attn": attn, "moe": moe, "layer": gdn + moe}[module]


# ----------------------------------------------------------------------------- timing
def event_times(fn, rep: int) -> list:
    """ms of each of `rep` calls, by CUDA events around each (the GPU's time, not the launch's)."""
    times = []
    for _ in range(rep):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return times


def time_ms(fn, warmup: int, rep: int, max_s: float = 4.0) -> float:
    """Median of per-call CUDA-event times, after warm-up; fewer reps if a call is slow."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = time.perf_counter() - t0
    rep = max(3, min(rep, int(max_s / max(one, 1e-6))))
    times = event_times(fn, rep)
    return statistics.median(times)


def bench(forward, x, params, args):
    """{pass: ms} for a module given as forward(x) -> tensor."""
    res = {}
    only = getattr(forward, "fwdbwd_only", False)
    if "fwd" in args.passes and not only:
        res["fwd"] = time_ms(lambda: forward(x), args.warmup, args.rep)
    y = forward(x)
    gy = torch.randn_like(y)
    if "bwd" in args.passes and not only:
        res["bwd"] = time_ms(lambda: y.backward(gy, retain_graph=True), args.warmup, args.rep)
    if only:  # a graphed forward waits for its backward before it replays again
        y.backward(gy)
    del y

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        forward(x).backward(gy)

    if "fwdbwd" in args.passes:
        res["fwdbwd"] = time_ms(step, args.warmup, args.rep)
    return res


def rows_for(module, impl, B, T, res, device):
    rows = []
    for p, ms in res.items():
        f = flops_fwd(module, T) * B * T * (1 if p == "fwd" else 2 if p == "bwd" else 3)
        rows.append(dict(module=module, impl=impl, B=B, T=T, passes=p, ms=round(ms, 4),
                         tokens_per_s=round(B * T / ms * 1e3), tflops=round(f / ms / 1e9, 2), device=device))
    return rows


# ----------------------------------------------------------------------------- our modules
def our_config():
    from nemo_qwen3_next.config import qwen3_next_80b_a3b

    return qwen3_next_80b_a3b(num_layers=4, moe_router_dtype="fp32")


_LAYERS = {}


def our_layer(kind: str):
    """Layer 1 of the hybrid pattern is GDN + MoE, layer 4 gated attention + MoE (built once)."""
    if kind not in _LAYERS:
        from megatron.core.transformer.moe import moe_utils
        from megatron.core.transformer.spec_utils import build_module

        from nemo_qwen3_next.spec import get_qwen3_next_layer_spec

        if not hasattr(moe_utils, "te_general_gemm"):  # megatron-core bug without TransformerEngine
            moe_utils.te_general_gemm = None
        cfg = our_config()
        spec = get_qwen3_next_layer_spec(cfg, backend="local")
        layer_number = 1 if kind == "gdn" else 4
        _LAYERS[kind] = build_module(spec, config=cfg, layer_number=layer_number).cuda()
    return _LAYERS[kind]


def our_forward(module: str, B: int, T: int):
    layer = our_layer("attn" if module == "attn" else "gdn")
    if module == "gdn":
        m = layer.self_attention
        return (lambda x: m(x)[0]), list(m.parameters())
    if module == "moe":
        m = layer.mlp
        return (lambda x: m(x)[0]), list(m.parameters())
    if module == "layer":
        return (lambda x: layer(x)[0]), list(layer.parameters())
    # gated attention with RoPE
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    cfg = layer.config
    rope = RotaryEmbedding(cfg.kv_channels, cfg.rotary_percent, rotary_base=cfg.rotary_base).cuda()
    emb = rope(T)
    m = layer.self_attention
    return (lambda x: m(x, None, rotary_pos_emb=emb)[0]), list(m.parameters())


def with_mixer_graphs(module, fwd):
    """fwd with `config.mixer_cuda_graphs` on while it runs. A graph replays a forward only once before
    its backward, so only the fwdbwd pass means anything for it (`bench` skips the others)."""
    cfg = our_layer("attn" if module == "attn" else "gdn").config

    def run(x):
        cfg.mixer_cuda_graphs = True
        try:
            return fwd(x)
        finally:
            cfg.mixer_cuda_graphs = False
    run.fwdbwd_only = True
    return run


def with_setting(module: str, name: str, value: str, fwd):
    """fwd with the module-level setting ``module.name`` set to ``value`` while it runs (the backward reads
    no setting, so it follows the forward)."""
    mod = importlib.import_module(module)  # the module itself (a package may export a same-named function)

    def run(x):
        old = getattr(mod, name)
        setattr(mod, name, value)
        try:
            return fwd(x)
        finally:
            setattr(mod, name, old)

    return run


def with_chunk_kernel(kernel, fwd):
    """fwd with `nemo_qwen3_next.ops.gated_delta_rule.CHUNK_KERNEL` set to `kernel` while it runs."""
    return with_setting("nemo_qwen3_next.ops.gated_delta_rule", "CHUNK_KERNEL", kernel, fwd)


GDN_IMPLS = ("ours", "ours-graphs", "ours-fla", "ours-triton", "ours-graphs-triton", "ours-vendor",
             "ours-graphs-vendor", "ours-qknorm", "ours-graphs-qknorm", "ours-noqknorm", "ours-graphs-noqknorm",
             "ours-fivegemm", "ours-graphs-fivegemm", "ours-recomputeh", "ours-graphs-recomputeh", "hf", "ref", "mcore")


def with_own_kernels(fwd, on: bool = True):
    """fwd with `nemo_qwen3_next.ops.own_kernels` on (our Triton conv and gated norm, the sequence-first GDN
    path; the default) or off (fla's conv and norm) while it runs."""
    return with_setting("nemo_qwen3_next.ops.own_kernels", "ENABLED", "1" if on else "0", fwd)


def with_fused_qk_norm(fwd, on: bool = True):
    """fwd with `own_kernels.FUSED_QK_NORM` on (the q/k L2-norm inside our conv; the default) or off (in the
    chunk kernel) while it runs."""
    return with_setting("nemo_qwen3_next.ops.own_kernels", "FUSED_QK_NORM", "1" if on else "0", fwd)


def with_one_in_proj_gemm(fwd, on: bool = True):
    """fwd with `own_kernels.ONE_IN_PROJ_GEMM` on (in_proj as one GEMM with column views; the default) or off
    (five GEMMs on the planar weight pieces) while it runs."""
    return with_setting("nemo_qwen3_next.ops.own_kernels", "ONE_IN_PROJ_GEMM", "1" if on else "0", fwd)


def ref_forward(B, T):
    m = our_layer("gdn").self_attention
    return (lambda x: m._forward_reference(x, None)[0]), list(m.parameters())


# ----------------------------------------------------------------------------- HF
_HF = {}


def hf_forward():
    if "gdn" not in _HF:
        from transformers import Qwen3NextConfig
        from transformers.models.qwen3_next import modeling_qwen3_next as hfm

        cfg = Qwen3NextConfig()  # defaults are 80B-A3B widths
        _HF["gdn"] = hfm.Qwen3NextGatedDeltaNet(cfg, layer_idx=0).to("cuda", torch.bfloat16)
    m = _HF["gdn"]

    def fwd(x):  # HF is batch-first [B, T, H]; ours [T, B, H]: give it the same tokens, transposed
        out = m(x.transpose(0, 1))
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(0, 1)

    return fwd, list(m.parameters())


# ----------------------------------------------------------------------------- megatron-core 0.16.1
def mcore_worker(args):
    """Runs in a child process with megatron-core 0.16.1 first on the path; prints JSON rows."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core import __version__ as mc_version
    from megatron.core import parallel_state
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    # its gated norm is torch.compile'd; the bwd-only timing re-runs backward (retain_graph)
    torch._functorch.config.donated_buffer = False
    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29517", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)
    cfg = TransformerConfig(
        num_layers=1, hidden_size=H, num_attention_heads=NQ, bf16=True, params_dtype=torch.bfloat16,
        normalization="RMSNorm", layernorm_epsilon=1e-6, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, linear_conv_kernel_dim=W, linear_key_head_dim=DK,
        linear_value_head_dim=DV, linear_num_key_heads=HK, linear_num_value_heads=HV,
    )
    local = LocalSpecProvider()
    spec = ModuleSpec(module=GatedDeltaNet, submodules=GatedDeltaNetSubmodules(
        in_proj=local.column_parallel_linear(), out_norm=local.layer_norm(rms_norm=True, for_qk=False),
        out_proj=local.row_parallel_linear()))
    m = build_module(spec, config=cfg, layer_number=1,
                     pg_collection=ProcessGroupCollection.use_mpu_process_groups()).cuda()
    device = torch.cuda.get_device_name()
    rows = []
    for B, T in parse_shapes(args.shapes):
        x = torch.randn(T, B, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        try:
            res = bench(lambda x: m(x, None)[0], x, list(m.parameters()), args)
            rows += rows_for("gdn", f"mcore-{mc_version}", B, T, res, device)
        except torch.OutOfMemoryError:
            print(f"mcore: OOM at B={B} T={T}", file=sys.stderr)
        del x
        torch.cuda.empty_cache()
    print("MCORE_ROWS " + json.dumps(rows))


def run_mcore_child(args):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([args.anchor_path, env.get("PYTHONPATH", "")])
    env.pop("PYTHONSAFEPATH", None)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "mcore", "--shapes", args.shapes,
           "--passes", ",".join(args.passes), "--warmup", str(args.warmup), "--rep", str(args.rep)]
    # run from /tmp so the checkout (nemo_qwen3_next) is not first on sys.path
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd="/tmp", timeout=args.mcore_timeout)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        sys.stderr.write(err[-3000:])
        print(f"mcore child timed out after {args.mcore_timeout} s", file=sys.stderr)
        return []
    sys.stderr.write(p.stderr[-4000:])
    for line in p.stdout.splitlines():
        if line.startswith("MCORE_ROWS "):
            return json.loads(line[len("MCORE_ROWS "):])
    print(f"mcore child failed (rc={p.returncode})", file=sys.stderr)
    return []


# ----------------------------------------------------------------------------- numerics
def check_numerics(T: int = 4096, B: int = 2):
    """Fused bf16 GDN vs the fp32 reference path on the same weights: forward and every gradient."""
    from megatron.core.transformer.spec_utils import build_module

    from nemo_qwen3_next.spec import get_qwen3_next_layer_spec

    fused = our_layer("gdn").self_attention
    cfg = our_config().replace(params_dtype=torch.float32, bf16=False)
    spec = get_qwen3_next_layer_spec(cfg, backend="local").submodules.linear_attention
    ref = build_module(spec, config=cfg, layer_number=1).cuda()  # deepcopy cannot copy process groups
    with torch.no_grad():
        for p, q in zip(ref.parameters(), fused.parameters()):
            p.copy_(q)
    ref.backend = ref.out_norm.backend = "torch"
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, B, H, device="cuda", generator=gen)
    probe = torch.randn(T, B, H, device="cuda", generator=gen)

    def run(m, xx):
        m.zero_grad(set_to_none=True)
        xx = xx.detach().requires_grad_(True)
        y = m(xx)[0]
        (y.float() * probe).sum().backward()
        return y.float(), {"x": xx.grad.float(), **{n: p.grad.float() for n, p in m.named_parameters()}}

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    y, g = run(fused, x.bfloat16())
    y_ref, g_ref = run(ref, x)
    out = {"B": B, "T": T, "fwd_rel_err": rel(y, y_ref),
           "grad_rel_err": {n: rel(g[n], g_ref[n]) for n in g_ref}}
    out["max_grad_rel_err"] = max(out["grad_rel_err"].values())
    fused.zero_grad(set_to_none=True)
    return out


# ----------------------------------------------------------------------------- plots
def visualize(rows, path_prefix):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for module in sorted({r["module"] for r in rows}):
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        for ax, p in zip(axes, PASSES):
            for impl in sorted({r["impl"] for r in rows if r["module"] == module}):
                pts = sorted((r["T"], r["ms"]) for r in rows
                             if r["module"] == module and r["impl"] == impl and r["passes"] == p and r["B"] == 1)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=impl)
            ax.set(xscale="log", yscale="log", xlabel="T (B=1)", ylabel="ms", title=f"{module} {p}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        f = f"{path_prefix}_{module}_time.png"
        fig.tight_layout()
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f)
    # speedup of ours over each other GDN implementation, fwd+bwd
    g = [r for r in rows if r["module"] == "gdn" and r["passes"] == "fwdbwd"]
    ours = {(r["B"], r["T"]): r["ms"] for r in g if r["impl"] == "ours"}
    others = sorted({r["impl"] for r in g} - {"ours"})
    if ours and others:
        shapes = sorted(ours, key=lambda s: (s[0] > 1, s[1]))
        fig, ax = plt.subplots(figsize=(12, 4.5))
        wdt = 0.8 / len(others)
        for i, impl in enumerate(others):
            o = {(r["B"], r["T"]): r["ms"] for r in g if r["impl"] == impl}
            xs = [j + i * wdt for j, s in enumerate(shapes) if s in o]
            ys = [o[s] / ours[s] for s in shapes if s in o]
            bars = ax.bar(xs, ys, wdt, label=f"vs {impl}")
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1, color="k", lw=0.8)
        ax.set_xticks([j + 0.4 - wdt / 2 for j in range(len(shapes))], [f"B{b} T{t}" for b, t in shapes])
        ax.set(ylabel="speedup of ours (x)", title="GDN layer forward+backward: speedup of ours")
        ax.legend()
        f = f"{path_prefix}_gdn_speedup.png"
        fig.tight_layout()
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f)
    return files


# ----------------------------------------------------------------------------- main
def parse_shapes(s):
    return [tuple(int(v) for v in item.lower().split("x")) for item in s.split(",") if item]


def main():
    from nemo_qwen3_next.kernel_cache import configure_kernel_cache, describe
    print(describe(configure_kernel_cache()), flush=True)  # before any kernel compiles; children inherit it
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modules", default="gdn,attn,moe,layer")
    ap.add_argument("--impls", default="ours,hf,mcore,ref", help="GDN implementations to compare")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="BxT,BxT,...")
    ap.add_argument("--module-max-tokens", type=int, default=65536, help="cap B*T for attn/moe/layer")
    ap.add_argument("--ref-max-tokens", type=int, default=2048)
    ap.add_argument("--passes", default=",".join(PASSES))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rep", type=int, default=20)
    ap.add_argument("--anchor-path", default="/tmp/site-anchor", help="site dir holding megatron-core 0.16.1")
    ap.add_argument("--check", action="store_true", help="numerics: fused bf16 vs fp32 reference")
    ap.add_argument("--out", default="benchmarks/results/benchmark.json")
    ap.add_argument("--visualize", action="store_true")
    ap.add_argument("--mcore-timeout", type=float, default=420, help="seconds for the megatron-core child")
    ap.add_argument("--baseline-flash-qla", action="store_true",
                    help="let fla route HF's and megatron-core's kernel calls to FlashQLA too (default: off, "
                         "FLA_FLASH_QLA=0, their stock fla Triton path; ours calls FlashQLA directly)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    bench_model.add_args(ap)
    bench_decode.add_args(ap)
    args = ap.parse_args()
    unknown = sorted({i for i in args.impls.split(",") if i} - set(GDN_IMPLS))
    if unknown:
        raise SystemExit(f"--impls: unknown {', '.join(unknown)}; choose from {', '.join(GDN_IMPLS)}")
    if not torch.cuda.is_available():  # every module here times CUDA kernels
        raise SystemExit("examples/benchmark.py needs a CUDA GPU and torch sees none here "
                         "(torch.cuda.is_available() is False); run it on the GPU machine (docs/gpu.md)")
    args.passes = [p for p in args.passes.split(",") if p]
    if not args.baseline_flash_qla:  # before fla is imported; inherited by the megatron-core child
        os.environ["FLA_FLASH_QLA"] = "0"
    if args.worker == "mcore":
        return mcore_worker(args)
    if args.worker == "hf-model":
        return bench_model.run(args, os.path.abspath(__file__), {}, lambda: None)

    from nemo_qwen3_next.model import init_distributed

    init_distributed()
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    modules = [m for m in args.modules.split(",") if m]
    impls = [i for i in args.impls.split(",") if i]
    shapes = parse_shapes(args.shapes)
    rows, errors = [], []
    result = dict(command=" ".join([os.path.basename(sys.executable)] + sys.argv), device=device,
                  torch=torch.__version__, rows=rows, errors=errors)
    try:
        import fla
        import triton

        result.update(fla=getattr(fla, "__version__", "?"), triton=triton.__version__)
        from importlib.metadata import version  # not `import transformers`: ~1 s of a second process's start

        result["transformers"] = version("transformers")
    except Exception as e:  # noqa: BLE001
        errors.append(f"versions: {e!r}")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    try:
        gdr = importlib.import_module("nemo_qwen3_next.ops.gated_delta_rule")  # the module, not the function

        result["gdn_chunk_kernel_setting"] = gdr.CHUNK_KERNEL
        result["flash_qla"] = not isinstance(gdr._load_flash_qla(), Exception)
    except Exception as e:  # noqa: BLE001
        errors.append(f"flash_qla: {e!r}")
    result["baseline_flash_qla"] = args.baseline_flash_qla
    if "gdn" in modules and "mcore" in impls:  # first: a time limit later in the ladder cannot lose it
        new = run_mcore_child(args)
        rows.extend(new)
        for r in new:
            print(f"gdn   {r['impl']} B={r['B']} T={r['T']:6d} {r['passes']:6s} {r['ms']:9.3f} ms", flush=True)
        save()

    if args.check and "gdn" in modules:
        result["numerics"] = check_numerics()
        print("numerics:", json.dumps(result["numerics"]), flush=True)

    if "decode" in modules:
        result["decode"] = bench_decode.run(args)  # its own JSON: --decode-out
        save()
    if "model" in modules:
        bench_model.run(args, os.path.abspath(__file__), result, save)
        if args.visualize:
            result["plots"] = bench_model.visualize(result, os.path.splitext(args.out)[0])
        save()
    for module in [m for m in modules if m not in ("model", "decode")]:
        for B, T in shapes:
            if module == "gdn":
                cands = [i for i in impls if i != "mcore"]
            else:  # only our own implementations exist for the other modules
                cands = [i for i in impls if i in ("ours", "ours-graphs")] or ["ours"]
            for impl in cands:
                if impl == "ref" and B * T > args.ref_max_tokens:
                    continue
                if module != "gdn" and B * T > args.module_max_tokens:
                    continue
                params, x = [], None
                try:
                    if impl == "ours":
                        fwd, params = our_forward(module, B, T)
                    elif impl == "ours-graphs":  # ours with config.mixer_cuda_graphs (fwd+bwd only)
                        fwd, params = our_forward(module, B, T)
                        fwd = with_mixer_graphs(module, fwd)
                    elif impl == "ours-fla":  # ours with fla's chunk kernel instead of FlashQLA
                        fwd, params = our_forward(module, B, T)
                        fwd = with_chunk_kernel("fla", fwd)
                    elif impl == "ours-triton":  # ours with our Triton conv and gated norm (QWEN3_NEXT_OWN_KERNELS=1)
                        fwd, params = our_forward(module, B, T)
                        fwd = with_own_kernels(fwd)
                    elif impl == "ours-graphs-triton":  # both; on a fresh layer, since a layer keeps the
                        _LAYERS.pop("attn" if module == "attn" else "gdn", None)  # graphs it captured (fla's kernels)
                        fwd, params = our_forward(module, B, T)
                        fwd = with_mixer_graphs(module, with_own_kernels(fwd))
                    elif impl.endswith(("-vendor", "-qknorm", "-fivegemm", "-recomputeh")):
                        # fla's conv and norm (OWN_KERNELS=0), the q/k L2-norm in our conv or not, or five in_proj
                        # GEMMs; on a fresh layer, since graphs are kept per layer
                        _LAYERS.pop("attn" if module == "attn" else "gdn", None)
                        fwd, params = our_forward(module, B, T)
                        if impl.endswith("-vendor"):
                            fwd = with_own_kernels(fwd, on=False)
                        elif impl.endswith("-fivegemm"):
                            fwd = with_one_in_proj_gemm(fwd, on=False)
                        elif impl.endswith("-recomputeh"):
                            fwd = with_setting("nemo_qwen3_next.ops.gated_delta_rule", "KEEP_CHUNK_STATES", "0", fwd)
                        else:
                            fwd = with_fused_qk_norm(fwd, on=not impl.endswith("-noqknorm"))
                        if impl.startswith("ours-graphs-"):
                            fwd = with_mixer_graphs(module, fwd)
                    elif impl == "hf":
                        fwd, params = hf_forward()
                    elif impl == "ref":
                        fwd, params = ref_forward(B, T)
                    else:
                        continue
                    x = torch.randn(T, B, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    res = bench(fwd, x, params, args)
                    new = rows_for(module, impl, B, T, res, device)
                    rows.extend(new)
                    save()
                    print(" ".join(f"{r['module']:5s} {r['impl']:6s} B={B} T={T:6d} {r['passes']:6s} "
                                   f"{r['ms']:9.3f} ms {r['tflops']:7.1f} TFLOP/s\n" for r in new), end="",
                          flush=True)
                except Exception as e:  # noqa: BLE001 - keep the ladder going, record what failed
                    msg = f"{module} {impl} B={B} T={T}: {type(e).__name__}: {str(e)[:300]}"
                    errors.append(msg)
                    print("ERROR", msg, flush=True)
                finally:
                    x = None
                    for p in params:
                        p.grad = None
                    torch.cuda.empty_cache()
    if args.visualize and rows:
        result["plots"] = result.get("plots", []) + visualize(rows, os.path.splitext(args.out)[0])
    save()
    summary(rows)


def summary(rows):
    """The acceptance numbers, printed last."""
    g = {(r["impl"], r["B"], r["T"]): r["ms"] for r in rows if r["module"] == "gdn" and r["passes"] == "fwdbwd"}
    mc = next((i for i, _, _ in g if i.startswith("mcore")), None)
    print("\nGDN fwd+bwd (ms):  shape | " + " | ".join(sorted({i for i, _, _ in g})))
    for B, T in sorted({(b, t) for _, b, t in g}):
        print(f"  B={B} T={T:6d} | " + " | ".join(f"{g.get((i, B, T), float('nan')):8.3f}"
                                                 for i in sorted({i for i, _, _ in g})))
    if ("ours", 4, 4096) in g:
        s = f"ours B=4 T=4096: {g[('ours', 4, 4096)]:.2f} ms (target <= 11)"
        if mc and (mc, 4, 4096) in g:
            s += f", {g[(mc, 4, 4096)] / g[('ours', 4, 4096)]:.2f}x {mc} (target >= 1.7)"
        print(s)
    if ("ours", 1, 32768) in g:
        print(f"ours B=1 T=32768: {g[('ours', 1, 32768)]:.2f} ms (target <= 20)")


if __name__ == "__main__":
    main()
