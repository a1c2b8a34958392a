"""NeMo loop vs the bare Megatron step on the same model: one JSON and one bar chart.

    python benchmarks/nemo_vs_bare.py BENCH_MODEL_JSON NEMO_METRICS_JSONL OUT_PREFIX [--warmup 5]

BENCH_MODEL_JSON is `examples/benchmark.py --modules model` output with the `fast` and `megatron_fast`
variants (the NeMo conf's levers, bare, and with Megatron DDP + Adam); NEMO_METRICS_JSONL is the
`metrics.jsonl` of `examples/pretrain.py model=qwen3_next_reduced data=mock` (its first `--warmup` steps
are left out, as the run's own summary does). Issue 10 holds the loop to >= 95% of `megatron_fast`'s
tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from nemo_qwen3_next.training.callbacks import read_metrics


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench_json")
    ap.add_argument("nemo_metrics")
    ap.add_argument("out_prefix")
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    bench = json.load(open(args.bench_json))
    rows = {r["variant"]: r for r in bench["model_rows"] if r["B"] == 2}
    recs = [r for r in read_metrics(args.nemo_metrics).values() if r["step"] > args.warmup]
    nemo_ms = statistics.median(r["step_time_s"] for r in recs) * 1e3
    bare = rows["megatron_fast"]
    out = {
        "shape": f"B=2 T=4096 (conf/data/mock.yaml), reduced model, bf16, one {bench.get('device', 'GPU')}",
        "bare_forward_backward_ms": rows["fast"]["step_ms"],
        "bare_megatron_step_ms": bare["step_ms"],
        "nemo_loop_median_step_ms": round(nemo_ms, 2),
        "nemo_steps_in_median": len(recs),
        "nemo_tokens_per_s_fraction_of_bare": round(bare["step_ms"] / nemo_ms, 4),
        "target_fraction": 0.95,
        "sources": [os.path.basename(args.bench_json), os.path.basename(args.nemo_metrics)],
    }
    out["met"] = out["nemo_tokens_per_s_fraction_of_bare"] >= out["target_fraction"]
    tmp = args.out_prefix + ".json.tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, args.out_prefix + ".json")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["fwd+bwd only\n(fast)", "+ Megatron DDP\n+ Adam (megatron_fast)", "NeMo loop\n(pretrain.py)"]
    vals = [out["bare_forward_backward_ms"], out["bare_megatron_step_ms"], out["nemo_loop_median_step_ms"]]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bars = ax.bar(names, vals, color=["#9ecae1", "#3182bd", "#e6550d"])
    ax.bar_label(bars, labels=[f"{v:.1f} ms" for v in vals])
    ax.axhline(bare["step_ms"] / 0.95, ls="--", c="gray", lw=1)
    ax.text(2.45, bare["step_ms"] / 0.95, "95% target", va="bottom", ha="right", fontsize=8, color="gray")
    ax.set_ylabel("ms per training step (median)")
    ax.set_title("Reduced Qwen3-Next, B=2 T=4096, H200")
    fig.tight_layout()
    fig.savefig(args.out_prefix + ".png", dpi=120)
    print(json.dumps(out, indent=1))
    print(f"wrote {args.out_prefix}.json and {args.out_prefix}.png")


if __name__ == "__main__":
    main()
