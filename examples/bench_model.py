"""Whole-model training step of a reduced Qwen3-Next, ours vs Hugging Face (``benchmark.py --modules model``).

The reduced model has 80B-A3B widths (hidden 2048; GDN 16/32 heads of 128; attention 16 heads of
256, 2 KV groups, partial RoPE; top-10 routed experts of 512 + a gated shared expert of 512;
vocab 151936) and ``--model-layers`` layers (default 4 = 3 GDN + 1 gated attention) with
``--experts`` experts (default 64): per-token compute is the 80B-A3B one, parameters fit one GPU.

One training step = forward, per-token loss, mean, backward (gradients set to None first; no
optimizer), bf16, random token ids, labels = the ids shifted by one. ``ours`` is
``nq.build_model(..., backend="local", device="cuda")`` (kernel path, every parameter made and initialised
on the GPU); ``hf`` is transformers'
``Qwen3NextForCausalLM`` in a child process (its own CUDA context, so peak memory is its own).
Reported: median step ms over ``--rep`` steps after ``--warmup``, tokens/s, achieved TFLOP/s and
MFU, peak allocated memory, and for ours a per-module breakdown and where the process's start went
(``imports_done`` / ``model_built`` / ``first_step_done_s_after_process_start``: seconds since the process began).

FLOP model (`nemo_qwen3_next.training.flops.forward_flops_per_token`, x3 for forward + backward):
matmuls 2·in·out per token; GDN chunk rule Hv·(6·Dk·Dv + 2·C·(3·Dk + 2·Dv)) and its conv; causal
attention 2·2·n·d·(T+1)/2; MoE router 2·h·E + top-k·6·h·f + shared 6·h·f_s; LM head 2·h·V.
At T=4096 this is 3.61 GFLOP/token for the default model. MFU = achieved / peak, against both the
bf16 dense peak of the data sheet (``--peak-tflops``, H200 SXM: 989.4) and the matmul peak measured in
the same run (an 8192³ bf16 GEMM, ~790 TFLOP/s on H200), the ceiling a real step can approach.

Breakdown (`module_breakdown`): the embedding, each layer's mixer and MLP, the final norm and the LM
head (+ loss), each timed alone (forward; forward + backward) on the inputs it saw in a real step;
``other`` = step minus their sum (norms of the residual stream, residual adds, gaps).

``--variants`` times ours with speed levers switched off one at a time, in the same process:
``base`` (all on), ``no_fused_ce``, ``no_fast_permute``, ``all_off``; ``graphs`` adds
``mixer_cuda_graphs``, ``stacked`` ``moe_stacked_experts``, ``fast`` both; ``megatron_step`` is ``base`` plus Megatron DDP and the mixed-precision Adam step, ``megatron_fast`` the same on
``fast`` (the levers `conf/model/qwen3_next_reduced.yaml` turns on): the NeMo loop's bare baseline.
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

VOCAB = 151936
REDUCED = dict(hidden_size=2048, num_attention_heads=16, num_query_groups=2, kv_channels=256,
               moe_ffn_hidden_size=512, moe_shared_expert_intermediate_size=512, moe_router_topk=10)
VARIANTS = {
    "base": {},
    "no_fused_ce": dict(fused_linear_cross_entropy=False),
    "no_fast_permute": dict(moe_fast_permute=False),
    "all_off": dict(fused_linear_cross_entropy=False, moe_fast_permute=False),
    "graphs": dict(mixer_cuda_graphs=True),  # GDN / attention mixers replayed from CUDA graphs
    "stacked": dict(moe_stacked_experts=True),  # one parameter per expert projection per layer
    "fast": dict(mixer_cuda_graphs=True, moe_stacked_experts=True),  # both
    # base + what Megatron's own loop adds: DDP grad buffers, the mixed-precision Adam step (the NeMo
    # loop's baseline; see `megatron_step`)
    "megatron_step": {},
    # activation memory options (docs/performance.md): the GDN core recomputed, then also Megatron's selective list
    "recompute_gdn": dict(linear_attention_recompute=True),
    "recompute_all": dict(linear_attention_recompute=True, recompute_granularity="selective",
                          recompute_modules=["core_attn", "moe", "layernorm"]),
}
VARIANTS["megatron_fast"] = VARIANTS["fast"]  # the same on the NeMo conf's levers


def reduced_config(layers: int = 4, experts: int = 64, **overrides):
    from nemo_qwen3_next.config import qwen3_next_80b_a3b

    kw = dict(REDUCED, num_layers=layers, num_moe_experts=experts, moe_router_dtype="fp32", vocab_size=VOCAB)
    kw.update(overrides)
    return qwen3_next_80b_a3b(**kw)


def hf_config(layers: int = 4, experts: int = 64):
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(vocab_size=VOCAB, hidden_size=2048, intermediate_size=5120, num_hidden_layers=layers,
                           num_attention_heads=16, num_key_value_heads=2, head_dim=256, partial_rotary_factor=0.25,
                           linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                           linear_value_head_dim=128, linear_conv_kernel_dim=4, num_experts=experts,
                           num_experts_per_tok=10, moe_intermediate_size=512, shared_expert_intermediate_size=512,
                           full_attention_interval=4)


def flops_per_token(layers, experts, T) -> float:
    """Training (fwd + bwd) FLOPs per token of the reduced model at sequence length T."""
    from nemo_qwen3_next.training.flops import forward_flops_per_token

    return 3.0 * forward_flops_per_token(reduced_config(layers, experts), T)["total"]


def step_times(step, warmup: int, rep: int):
    """Per-step ms (CUDA events), after warm-up; the first step's wall time is returned too."""
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        step()
    from benchmark import event_times  # noqa: the sibling script

    return event_times(step, rep), first


def process_age_s():
    """Seconds since this process started (Linux /proc), None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            start = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            return round(float(f.read().split()[0]) - start / os.sysconf("SC_CLK_TCK"), 2)
    except Exception:  # noqa: BLE001
        return None


def matmul_peak_tflops(n: int = 8192, rep: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    times, _ = step_times(lambda: a @ b, 3, rep)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def _batch(B, T, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T + 1), device="cuda", generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


# ----------------------------------------------------------------------------- breakdown
def module_breakdown(model, fwd, warmup: int = 2, rep: int = 5):
    """ms per module, forward and backward, each run alone on the inputs it saw in a real forward.

    Each module's inputs are captured once (forward pre-hooks), made leaves that require grad (so
    the input gradient is computed as in the step), and the module is timed alone: forward, then
    forward + backward of its first output with a random gradient. ``other`` is what the whole step
    takes beyond the sum (residual adds, rotary tables, allocator, launch gaps between modules).
    """
    mods = _module_list(model)
    captured, hooks = {}, []
    for name, m in mods:
        def cap(mod, a, kw, name=name):
            captured.setdefault(name, (a, kw, getattr(mod, "pending_labels", None)))
        hooks.append(m.register_forward_pre_hook(cap, with_kwargs=True))
    try:
        fwd()
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, m in mods:
        a, kw, pending = captured[name]
        leaf = lambda t: t.detach().requires_grad_() if torch.is_tensor(t) and t.is_floating_point() else t  # noqa: E731
        a, kw = [leaf(t) for t in a], {k: leaf(v) for k, v in kw.items()}

        def run():
            if pending is not None:
                m.pending_labels = pending
            try:
                y = m(*a, **kw)
            finally:
                if pending is not None:
                    m.pending_labels = None
            return y[0] if isinstance(y, tuple) else y

        y0 = run()
        g = torch.randn_like(y0)  # one forward to learn the output's shape and dtype
        del y0

        def fb():
            m.zero_grad(set_to_none=True)
            run().backward(g)

        f = statistics.median(step_times(run, warmup, rep)[0])
        fbt = statistics.median(step_times(fb, warmup, rep)[0])
        out[f"fwd/{name}"], out[f"bwd/{name}"] = round(f, 3), round(max(fbt - f, 0.0), 3)
    return out


def _module_list(model):
    mods = [("embedding", model.embedding)]
    for i, layer in enumerate(model.decoder.layers):
        kind = "gdn" if layer.layer_type.startswith("linear") else "attn"
        mods.append((f"layer{i}.{kind}", layer.self_attention))
        mods.append((f"layer{i}.{'moe' if hasattr(layer.mlp, 'router') else 'mlp'}", layer.mlp))
    mods.append(("final_norm", model.decoder.final_layernorm))
    mods.append(("lm_head+loss", model.output_layer))
    return mods


# ----------------------------------------------------------------------------- ours
def run_ours(args, B, T, variant: str):
    import nemo_qwen3_next as nq
    from nemo_qwen3_next.ops import usage

    usage.reset()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cfg = reduced_config(args.model_layers, args.experts, **VARIANTS[variant])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = nq.build_model(cfg, backend="local", device="cuda")
    torch.cuda.synchronize()
    build_s, built = time.perf_counter() - t0, process_age_s()
    ids, labels = _batch(B, T)
    pos = torch.arange(T, device="cuda")[None].expand(B, T)

    losses = []

    def fwd():
        loss = model(ids, pos, None, labels=labels)
        if not losses:  # the first step's loss: variants with the same math must agree on it
            losses.append(loss.detach().float().mean())
        return loss

    def bwd(loss):
        loss.mean().backward()

    def step():
        model.zero_grad(set_to_none=True)
        bwd(fwd())

    if variant.startswith("megatron_"):
        step = megatron_step(model, cfg, fwd)
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first, since_start = time.perf_counter() - t0, process_age_s()
    times, _ = step_times(step, args.warmup, args.rep)
    res = dict(impl="ours", variant=variant, B=B, T=T, build_s=round(build_s, 2), first_step_s=round(first, 2),
               imports_done_s_after_process_start=getattr(args, "imports_done_s", None),
               model_built_s_after_process_start=built, first_step_done_s_after_process_start=since_start,
               params=sum(p.numel() for p in model.parameters()))
    res.update(_summary(times, B, T, args))
    res["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    res["impls"] = usage.kernels_used()
    res["first_loss"] = round(losses[0].item(), 6)
    if not variant.startswith("megatron_"):  # same weights and batch every step: the gradient must match across variants
        res["grad_norm"] = round(torch.stack([p.grad.float().norm() for p in model.parameters()
                                               if p.grad is not None]).norm().item(), 6)
    if variant == "base" and not args.no_breakdown:
        try:
            bd = module_breakdown(model, fwd)
            bd["other"] = round(res["step_ms"] - sum(bd.values()), 3)
            res["breakdown_ms"] = bd
        except Exception as e:  # noqa: BLE001 - the timing above stands without it
            res["breakdown_error"] = f"{type(e).__name__}: {e}"[:300]
    if (variant == "base" or variant.startswith("megatron_")) and args.profile:
        gaps = _profile(step, args.profile + f".{variant}.B{B}T{T}.txt")
        res["gpu_idle_ms_per_step"] = gaps["gpu_idle_ms_per_step"]
    del model
    torch.cuda.empty_cache()
    return res


def megatron_step(model, cfg, fwd):
    """A training step as Megatron's loop runs it, with the DDP and optimizer settings of our NeMo recipe
    (`training/recipe.py`: fp32 grad buffers, overlapped grad reduce, NaN check; `conf/optim/tiny.yaml`'s
    Adam, clip 1.0, no distributed optimizer): the bare baseline the NeMo loop is held to (>= 95%)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from nemo_qwen3_next.training import fixes

    fixes.use_fused_torch_adam()  # as examples/pretrain.py does (training.fixes.apply)
    fixes.use_foreach_multi_tensor_ops()
    fixes.defer_grad_nan_check()
    fixes.fold_clip_into_fused_adam()

    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(
        check_for_nan_in_grad=True, grad_reduce_in_fp32=True, overlap_grad_reduce=True,
        use_distributed_optimizer=False, average_in_collective=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=3e-4, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=1.0,
        bf16=True, params_dtype=torch.bfloat16, use_distributed_optimizer=False), [ddp])

    def step():
        ddp.zero_grad_buffer()
        opt.zero_grad()
        fwd().mean().backward()  # fwd calls the wrapped module; DDP's hooks fill the grad buffers
        ddp.finish_grad_sync()
        opt.step()

    return step


def _profile(step, path, steps: int = 3):
    """Kernel time per op over `steps` steps (torch.profiler, sorted by CUDA time), the GPU's idle gaps
    (`training.profiling.gpu_gaps`, the measure the NeMo loop's `logging.profile_steps` reports too), then
    cProfile over as many steps (`path` with .python.txt)."""
    import cProfile

    from torch.profiler import ProfilerActivity, profile

    from nemo_qwen3_next.training.profiling import gpu_gaps, python_table, tables

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    gaps = gpu_gaps(prof.events(), steps)
    with open(path, "w") as f:
        f.write(tables(prof, gaps))
        f.write("\n\nby input shape (self CUDA)\n")
        f.write(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cuda_time_total", row_limit=50,
                                                                   max_name_column_width=40))
    with open(path.replace(".txt", ".gaps.json"), "w") as f:
        json.dump(gaps, f, indent=1)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    pr.disable()
    with open(path.replace(".txt", ".python.txt"), "w") as f:
        f.write(python_table(pr))
    return gaps


def _summary(times, B, T, args):
    ms = statistics.median(times)
    fl = flops_per_token(args.model_layers, args.experts, T) * B * T
    tflops = fl / ms / 1e9
    out = dict(step_ms=round(ms, 3), step_ms_all=[round(t, 3) for t in times], tokens_per_s=round(B * T / ms * 1e3),
               tflops=round(tflops, 1), mfu_spec=round(tflops / args.peak_tflops, 4))
    if args.matmul_peak:
        out["mfu_measured_peak"] = round(tflops / args.matmul_peak, 4)
    return out


# ----------------------------------------------------------------------------- HF (child process)
def hf_worker(args):
    from transformers import Qwen3NextForCausalLM

    torch.manual_seed(0)
    m = Qwen3NextForCausalLM(hf_config(args.model_layers, args.experts)).to("cuda", torch.bfloat16).train()
    import transformers

    def make_step(B, T):
        ids, _ = _batch(B, T)

        def step():  # HF's own loss path (it shifts the labels itself): as its users train
            m.zero_grad(set_to_none=True)
            m(ids, labels=ids, use_cache=False).loss.backward()
        return step

    if args.go_file:  # compile everything now, time only when the parent says the GPU is ours alone
        for B, T in args.shape_list:
            try:
                make_step(B, T)()
                torch.cuda.synchronize()
            except torch.OutOfMemoryError:
                pass
            print(f"HF_WARM B={B} T={T} after {process_age_s()} s", flush=True)
        m.zero_grad(set_to_none=True)
        while not os.path.exists(args.go_file):
            time.sleep(0.2)
    for B, T in args.shape_list:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        step = make_step(B, T)

        try:
            times, first = step_times(step, args.warmup, args.rep)
        except torch.OutOfMemoryError:
            print("HF_ROW " + json.dumps(dict(impl="hf", B=B, T=T, error="OOM")), flush=True)
            continue
        r = dict(impl="hf", variant=f"transformers-{transformers.__version__}", B=B, T=T, first_step_s=round(first, 2))
        r.update(_summary(times, B, T, args))
        r["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        print("HF_ROW " + json.dumps(r), flush=True)  # one line per row: a time limit keeps the finished ones


def _hf_cmd(args, script, go_file=None):
    cmd = [sys.executable, script, "--modules", "model", "--worker", "hf-model", "--shapes", args.shapes,
           "--model-layers", str(args.model_layers), "--experts", str(args.experts), "--warmup", str(args.warmup),
           "--rep", str(args.rep), "--peak-tflops", str(args.peak_tflops), "--matmul-peak", str(args.matmul_peak or 0)]
    return cmd + (["--go-file", go_file] if go_file else [])


def _hf_rows(args, out, err):
    rows = [json.loads(line[len("HF_ROW "):]) for line in out.splitlines() if line.startswith("HF_ROW ")]
    return rows if len(rows) == len(args.shape_list) else rows + [dict(impl="hf", error=err)]


def run_hf_child(args, script):
    try:
        p = subprocess.run(_hf_cmd(args, script), capture_output=True, text=True, timeout=args.hf_timeout)
        out, err = p.stdout, f"rc={p.returncode}: {p.stderr[-1500:]}"
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = f"timed out after {args.hf_timeout} s"
    return _hf_rows(args, out, err)


class ConcurrentHF:
    """The HF child started first, compiling while ours compiles (JIT compiles are CPU work: a cold H200
    machine spends ~300 s on HF's kernels and ~200 s per shape on ours); it times only after `go()`, when
    ours has finished timing, so the two never share the GPU while either is timed."""

    def __init__(self, args, script):
        import tempfile

        self.args, self.dir = args, tempfile.mkdtemp(prefix="bench_model_hf_")
        self.go_file, self.t0 = os.path.join(self.dir, "go"), time.time()
        self.out = open(os.path.join(self.dir, "stdout"), "w+")
        self.err = open(os.path.join(self.dir, "stderr"), "w+")
        self.p = subprocess.Popen(_hf_cmd(args, script, self.go_file), stdout=self.out, stderr=self.err, text=True)

    def _text(self, f):
        f.flush()
        with open(f.name) as g:
            return g.read()

    def wait_warm(self, timeout: float):
        """Until the child has compiled every shape or died; killed at `timeout` s since its start, so
        its compiles never run beside a timed step of ours."""
        while self.p.poll() is None:
            if self._text(self.out).count("HF_WARM") >= len(self.args.shape_list):
                return
            if time.time() - self.t0 > timeout:
                self.p.kill()
                self.p.wait()
                return
            time.sleep(0.5)

    def go(self):
        if self.p.poll() is not None:  # died or killed while compiling
            return _hf_rows(self.args, self._text(self.out),
                            f"rc={self.p.returncode} before timing: {self._text(self.err)[-1500:]}")
        open(self.go_file, "w").close()
        left = max(1.0, self.args.hf_timeout - (time.time() - self.t0))
        try:
            self.p.wait(timeout=left)
            err = f"rc={self.p.returncode}: {self._text(self.err)[-1500:]}"
        except subprocess.TimeoutExpired:
            self.p.kill()
            err = f"timed out after {self.args.hf_timeout} s"
        return _hf_rows(self.args, self._text(self.out), err)


# ----------------------------------------------------------------------------- driver
def add_args(ap):
    g = ap.add_argument_group("--modules model")
    g.add_argument("--model-layers", type=int, default=4, help="layers of the reduced model (every 4th is attention)")
    g.add_argument("--experts", type=int, default=64, help="routed experts per layer (top-10)")
    g.add_argument("--model-impls", default="ours,hf", help="ours and/or hf, run in this order")
    g.add_argument("--variants", default="base", help="ours with levers off: " + ",".join(VARIANTS))
    g.add_argument("--peak-tflops", type=float, default=989.4, help="data-sheet bf16 dense peak (H200 SXM)")
    g.add_argument("--matmul-peak", type=float, default=None, help=argparse.SUPPRESS)
    g.add_argument("--hf-timeout", type=float, default=600)
    g.add_argument("--no-breakdown", action="store_true")
    g.add_argument("--profile", default=None, help="write torch.profiler's kernel table of ours (base) here")
    g.add_argument("--hf-concurrent", action="store_true",
                   help="start the HF child first so its kernels compile while ours do; it times after ours")
    g.add_argument("--prewarm", action="store_true", help="one untimed step of ours per shape before any timing")
    g.add_argument("--wait-file", default=None,
                   help="before any timing, wait until these files exist (comma-separated: other GPU jobs of the same call are done)")
    g.add_argument("--go-file", default=None, help=argparse.SUPPRESS)  # HF child: time once this exists


def run(args, script, result, save):
    """Fills result["model"] (rows) for the shapes in args.shapes; calls save() after each row."""
    from benchmark import parse_shapes  # noqa: the sibling script

    args.shape_list = parse_shapes(args.shapes)
    if args.worker == "hf-model":
        return hf_worker(args)
    # benchmark.py has imported torch, megatron-core, fla, triton and FlashQLA (TileLang) and made the process
    # group by now; what the first step still imports (fla's kernel modules) counts in its time
    args.imports_done_s = process_age_s()
    impls = [i for i in args.model_impls.split(",") if i]
    hf = ConcurrentHF(args, script) if args.hf_concurrent and "hf" in impls else None
    if args.prewarm and "ours" in impls:
        result["prewarm_s"] = prewarm_ours(args)
    if args.wait_file:
        t = time.time()
        while not all(os.path.exists(f) for f in args.wait_file.split(",")):
            time.sleep(0.5)
        result["waited_for_other_job_s"] = round(time.time() - t, 1)
    if hf is not None:
        hf.wait_warm(args.hf_timeout)
    args.matmul_peak = args.matmul_peak or matmul_peak_tflops()
    rows = result.setdefault("model_rows", [])
    result["matmul_peak_tflops"] = round(args.matmul_peak, 1)
    result["flop_model_gflop_per_token"] = {f"T={T}": round(flops_per_token(args.model_layers, args.experts, T) / 1e9, 3)
                                            for _, T in args.shape_list}
    for impl in impls:  # in the order given (a concurrent HF child times after ours)
        if impl == "hf" and hf is not None:
            continue
        if impl == "ours":
            for B, T in args.shape_list:
                for v in [v for v in args.variants.split(",") if v]:
                    try:
                        r = run_ours(args, B, T, v)
                    except Exception as e:  # noqa: BLE001
                        r = dict(impl="ours", variant=v, B=B, T=T, error=f"{type(e).__name__}: {e}"[:400])
                    rows.append(r)
                    save()
                    print(_line(r), flush=True)
        elif impl == "hf":
            for r in run_hf_child(args, script):
                rows.append(r)
                print(_line(r), flush=True)
            save()
        else:
            raise SystemExit(f"--model-impls: unknown {impl!r}; use ours and/or hf")
    if hf is not None:
        for r in hf.go():
            rows.append(r)
            print(_line(r), flush=True)
        save()
    _acceptance(rows)


def prewarm_ours(args) -> float:
    """One untimed training step of ours (all levers on, and with mixer graphs) per shape: the JIT
    compiles and autotuning happen here, not in a timed variant. Seconds taken."""
    import nemo_qwen3_next as nq

    t0 = time.perf_counter()
    for B, T in args.shape_list:
        model = nq.build_model(reduced_config(args.model_layers, args.experts), backend="local", device="cuda")
        ids, labels = _batch(B, T)
        pos = torch.arange(T, device="cuda")[None].expand(B, T)
        model(ids, pos, None, labels=labels).mean().backward()
        torch.cuda.synchronize()
        print(f"prewarm B={B} T={T} done after {time.perf_counter() - t0:.0f} s", flush=True)
        del model
        torch.cuda.empty_cache()
    return round(time.perf_counter() - t0, 1)


def _line(r):
    if "error" in r:
        return f"model {r.get('impl')} {r.get('variant', '')} B={r.get('B')} T={r.get('T')}: ERROR {r['error'][:300]}"
    return (f"model {r['impl']:4s} {r['variant']:18s} B={r['B']} T={r['T']}: {r['step_ms']:8.2f} ms  "
            f"{r['tokens_per_s'] / 1e3:6.1f}K tok/s  {r['tflops']:6.1f} TFLOP/s  MFU {100 * r['mfu_spec']:.1f}% "
            f"(of measured peak {100 * r.get('mfu_measured_peak', float('nan')):.1f}%)  peak {r['peak_mem_gib']} GiB  "
            f"first step {r['first_step_s']} s" + _start_split(r))


def _start_split(r):
    """' (after start: imports 12.3 s, model built 14.0 s, first step done 20.5 s)' where measured."""
    keys = [("imports", "imports_done_s_after_process_start"), ("model built", "model_built_s_after_process_start"),
            ("first step done", "first_step_done_s_after_process_start")]
    parts = [f"{label} {r[k]} s" for label, k in keys if r.get(k) is not None]
    return f" (after start: {', '.join(parts)})" if parts else ""


def _acceptance(rows):
    """ours (all levers on) vs HF per shape, printed last; variants' loss and gradient norm vs base."""
    for r in rows:
        b = next((x for x in rows if x.get("variant") == "base" and x["B"] == r.get("B") and x["T"] == r.get("T")
                  and "error" not in x), None)
        if b and "error" not in r and r.get("impl") == "ours" and r["variant"] != "base":
            r["vs_base"] = dict(loss_rel=abs(r["first_loss"] - b["first_loss"]) / abs(b["first_loss"]))
            if "grad_norm" in r:
                r["vs_base"]["grad_norm_rel"] = abs(r["grad_norm"] - b["grad_norm"]) / b["grad_norm"]
            print(f"B={r['B']} T={r['T']} {r['variant']}: vs base {json.dumps(r['vs_base'])}")
    best = {(r["impl"], r["B"], r["T"]): r for r in rows
            if "error" not in r and (r["impl"] == "hf" or r.get("variant") == "base")}
    for (impl, B, T), r in sorted(best.items()):
        h = best.get(("hf", B, T))
        if impl == "ours" and h:
            print(f"B={B} T={T}: ours {r['step_ms']:.1f} ms vs HF {h['step_ms']:.1f} ms = "
                  f"{h['step_ms'] / r['step_ms']:.2f}x; MFU {100 * r['mfu_spec']:.1f}% of spec, "
                  f"{100 * r.get('mfu_measured_peak', 0):.1f}% of measured peak; "
                  f"peak memory {r['peak_mem_gib']} vs {h['peak_mem_gib']} GiB")


def visualize(result, prefix):
    """PNG: step time ours vs HF per shape, and our per-module breakdown (stacked fwd/bwd)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.get("model_rows", []) if "error" not in r]
    if not rows:
        return []
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = sorted({(r["impl"], r["variant"]) for r in rows})
    shapes = sorted({(r["B"], r["T"]) for r in rows})
    w = 0.8 / len(labels)
    for i, lab in enumerate(labels):
        vals = [next((r["step_ms"] for r in rows if (r["impl"], r["variant"]) == lab and (r["B"], r["T"]) == s), 0)
                for s in shapes]
        ax.bar([j + i * w for j in range(len(shapes))], vals, w, label=f"{lab[0]} {lab[1]}")
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(shapes))], [f"B={b} T={t}" for b, t in shapes])
    ax.set_ylabel("training step (ms, lower is better)")
    ax.set_title(f"Reduced Qwen3-Next step on {result.get('device', '?')}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = prefix + "_model_step.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    bds = [r for r in rows if r.get("breakdown_ms")]
    if bds:
        fig, axes = plt.subplots(1, len(bds), figsize=(6 * len(bds), 4.5), squeeze=False)
        for ax, r in zip(axes[0], bds):
            bd = r["breakdown_ms"]
            names = [k[4:] for k in bd if k.startswith("fwd/")]
            f = [bd[f"fwd/{n}"] for n in names] + [max(bd.get("other", 0), 0)]
            b = [bd.get(f"bwd/{n}", 0) for n in names] + [0]
            names = names + ["other"]
            ax.barh(names, f, label="forward")
            ax.barh(names, b, left=f, label="backward")
            ax.invert_yaxis()
            ax.set_xlabel("ms")
            ax.set_title(f"ours B={r['B']} T={r['T']}: {r['step_ms']:.1f} ms/step")
            ax.legend()
        fig.tight_layout()
        p = prefix + "_model_breakdown.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths
