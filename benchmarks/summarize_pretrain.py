"""Summarise pretraining runs' metrics.jsonl files: a JSON table and one loss-curve PNG.

    python benchmarks/summarize_pretrain.py benchmarks/results/h200x2_pretrain

Reads every ``NAME.metrics.jsonl`` (written by `TrainingMetrics`) in the folder; step 1 (kernel JIT
and torch.compile warm-up) is left out of the throughput medians.
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import sys

from nemo_qwen3_next.training.callbacks import read_metrics


def summarize(folder: str) -> dict:
    runs = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.metrics.jsonl"))):
        name = os.path.basename(path).split(".")[0]
        recs = list(read_metrics(path).values())  # by step; a rerun's record wins, as in the run's own PNG
        if not recs:
            continue
        steady = [r for r in recs if r["step"] > 1] or recs
        # every implementation any segment ran (a resumed run may log a second set)
        kernels = sorted(set().union(*(r["kernels"] for r in recs if "kernels" in r))) or None
        runs[name] = {
            "steps_logged": len(recs),
            "last_step": recs[-1]["step"],
            "loss_first": recs[0]["loss"],
            "loss_last": recs[-1]["loss"],
            "loss_min": min(r["loss"] for r in recs),
            "median_step_time_s": statistics.median(r["step_time_s"] for r in steady),
            "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
            "median_tflops_per_gpu": statistics.median(r["tflops_per_gpu"] for r in steady),
            "first_step_time_s": recs[0]["step_time_s"],
            "kernels": kernels,
            "loss": [[r["step"], r["loss"]] for r in recs],
        }
    return runs


def plot(runs: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in runs.items():
        steps, loss = zip(*r["loss"])
        ax.plot(steps, loss, label=f"{name} ({r['median_tokens_per_s']:.0f} tok/s)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (byte-level)")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Qwen3-Next pretraining on H200 (kernel path)")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    folder = sys.argv[1]
    runs = summarize(folder)
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump({k: {kk: vv for kk, vv in v.items() if kk != "loss"} for k, v in runs.items()}, f, indent=1)
    plot(runs, os.path.join(folder, "loss_curves.png"))
    for k, v in runs.items():
        print(f"{k:16s} steps {v['last_step']:4d} loss {v['loss_first']:.3f} -> {v['loss_last']:.3f} (min {v['loss_min']:.3f}) "
              f"| {v['median_tokens_per_s']:8.0f} tok/s | {v['median_tflops_per_gpu']:6.2f} TFLOP/s/GPU "
              f"| step {v['median_step_time_s']:.2f} s (first {v['first_step_time_s']:.0f} s) | {v['kernels']}")
