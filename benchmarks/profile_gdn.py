"""Where the GDN layer's forward+backward time goes: torch.profiler's top CUDA kernels, per variant.

Variants (our layer at 80B-A3B widths, bf16, ``[T, B, 2048]`` input):

* ``flash_qla-triton``: the default fused path (FlashQLA chunk kernel, our Triton convs and gated norm, sequence-first,
  in_proj as one GEMM with column views);
* ``flash_qla``: the same with fla's conv and norm (``QWEN3_NEXT_OWN_KERNELS=0``: five in_proj GEMMs on weight pieces);
* ``fla``:       fla's chunk kernel, the same planar projections;
* ``fla-cat``:   fla's chunk kernel, one in_proj GEMM + a ``cat`` of q/k/v (the path before FlashQLA).

Run on the GPU machine (see docs/gpu.md)::

    python3 benchmarks/profile_gdn.py --shape 4x4096 --variants flash_qla,fla-cat --top 25
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def load_benchmark():
    sys.path.insert(0, os.path.join(HERE, "..", "examples"))  # benchmark.py imports its sibling scripts
    spec = importlib.util.spec_from_file_location("benchmark", os.path.join(HERE, "..", "examples", "benchmark.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="4x4096")
    ap.add_argument("--variants", default="flash_qla,fla,fla-cat")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("FLA_FLASH_QLA", "0")
    bm = load_benchmark()
    from nemo_qwen3_next.model import init_distributed
    gdr = importlib.import_module("nemo_qwen3_next.ops.gated_delta_rule")  # the module, not the function
    own = importlib.import_module("nemo_qwen3_next.ops.own_kernels")

    init_distributed()
    torch.manual_seed(0)
    B, T = (int(v) for v in args.shape.split("x"))
    fwd, params = bm.our_forward("gdn", B, T)
    layer = bm.our_layer("gdn").self_attention
    x = torch.randn(T, B, bm.H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn_like(x)

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        fwd(x).backward(gy)

    for variant in args.variants.split(","):
        gdr.CHUNK_KERNEL = "flash_qla" if variant.startswith("flash_qla") else "fla"
        own.ENABLED = "1" if variant.endswith("-triton") else "0"
        layer.split_in_proj = variant != "fla-cat"
        ms = bm.time_ms(step, warmup=3, rep=10)
        print(f"\n=== {variant}: B={B} T={T} fwd+bwd {ms:.3f} ms (median of CUDA-event times)", flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.iters):
                step()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
        events.sort(key=lambda e: -e.self_device_time_total)
        total = sum(e.self_device_time_total for e in events) / args.iters / 1e3
        print(f"    sum of kernel times per step: {total:.3f} ms")
        for e in events[: args.top]:
            t = e.self_device_time_total / args.iters / 1e3
            print(f"    {t:8.3f} ms {100 * t / total:5.1f}%  x{e.count // args.iters:<3d} {e.key[:110]}")
        sys.stdout.flush()
    gdr.CHUNK_KERNEL, own.ENABLED = "auto", "0"
    layer.split_in_proj = True


if __name__ == "__main__":
    main()
