"""Lightning callbacks for pretraining: progress + throughput, MoE expert load, loss-curve PNG.

`TrainingMetrics` owns one record per optimizer step (loss, lr, tokens/s, TFLOP/s per GPU, MoE
load), prints a progress line, writes TensorBoard scalars and appends the record to
``<run_dir>/metrics/metrics.jsonl`` (the loss curve a resumed run continues; a directory, because
NeMo moves the files at the top of a run directory into ``run_N/`` when a run restarts). Every rank runs the
callback; the few collectives it issues (one broadcast, one all-reduce) are called by all ranks at
the same steps, never by rank 0 alone.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Dict, Optional

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from ..ops.usage import kernels_used


def _world():
    return (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)


def _comm_device() -> torch.device:
    """Where collective buffers must live: the current GPU under NCCL, else the CPU (gloo)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class ExpertLoad:
    """Counts tokens routed to each expert per MoE layer (forward hooks on Megatron's routers)."""

    def __init__(self, num_layers: int, num_experts: int):
        self.shape = (num_layers, num_experts)
        self.counts: Optional[torch.Tensor] = None  # on the routers' device: no host sync per layer
        self.handles = []

    def attach(self, model: torch.nn.Module) -> int:
        for module in model.modules():
            index = getattr(module, "layer_index", None)
            router = getattr(getattr(module, "mlp", None), "router", None)
            if index is None or router is None:
                continue

            def hook(mod, _inp, out, index=index):
                if not mod.training:  # count training batches only
                    return
                routing_map = out[1]  # [tokens, experts] bool
                if self.counts is None:
                    self.counts = torch.zeros(self.shape, dtype=torch.float64, device=routing_map.device)
                self.counts[index] += routing_map.detach().sum(0)

            self.handles.append(router.register_forward_hook(hook))
        return len(self.handles)

    def collect(self) -> Dict[str, float]:
        """Per-layer load imbalance (max / mean tokens per expert; 1 is perfect) and usage entropy
        (normalised to [0, 1]; 1 is uniform) over all ranks since the last call; then reset."""
        counts = torch.zeros(self.shape, dtype=torch.float64) if self.counts is None else self.counts.clone()
        if dist.is_initialized():  # every rank calls this at the same steps (see module doc)
            counts = counts.to(_comm_device(), torch.float32)
            dist.all_reduce(counts)
        counts = counts.to("cpu", torch.float64)
        if self.counts is not None:
            self.counts.zero_()
        out, imbalances, entropies = {}, [], []
        num_experts = counts.shape[1]
        for i, row in enumerate(counts):
            total = row.sum().item()
            if total == 0:
                continue
            p = row / total
            imbalance = (row.max() / row.mean()).item()
            entropy = -(p[p > 0] * p[p > 0].log()).sum().item() / math.log(num_experts)
            out[f"moe/layer{i:02d}_imbalance"] = imbalance
            out[f"moe/layer{i:02d}_entropy"] = entropy
            imbalances.append(imbalance)
            entropies.append(entropy)
        if imbalances:
            out["moe/imbalance_max"] = max(imbalances)
            out["moe/entropy_mean"] = sum(entropies) / len(entropies)
        return out


class TrainingMetrics(Callback):
    def __init__(self, run_dir: str, tokens_per_step: int, flops_per_step: float, log_every_n_steps: int = 1,
                 metrics_file: str = "metrics.jsonl", moe_layers: int = 0, num_experts: int = 0,
                 loss_curve_png: bool = True):
        self.out_dir = os.path.join(run_dir, "metrics")
        self.path = os.path.join(self.out_dir, metrics_file)
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_step
        self.every = max(1, log_every_n_steps)
        self.expert_load = ExpertLoad(moe_layers, num_experts) if num_experts else None
        self.loss_curve_png = loss_curve_png
        self._t0: Optional[float] = None
        self._elapsed = 0.0
        self._steps = 0
        self._kernels: Optional[list] = None

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer, pl_module):
        if self.expert_load is not None:
            self.expert_load.attach(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        dt = time.perf_counter() - (self._t0 or time.perf_counter())
        self._elapsed += dt
        self._steps += 1
        step = trainer.global_step
        last = step >= trainer.max_steps
        if step % self.every and not last:
            return
        world, rank = _world()
        record = {"step": step, "loss": self._loss(trainer, outputs), "lr": self._lr(trainer)}
        record = self._from_last_rank(record)  # the loss lives on the last pipeline stage
        secs = self._elapsed / self._steps
        record["step_time_s"] = secs
        record["tokens_per_s"] = self.tokens_per_step / secs
        record["tflops_per_gpu"] = self.flops_per_step / secs / world / 1e12
        self._elapsed, self._steps = 0.0, 0
        if self.expert_load is not None:
            record.update(self.expert_load.collect())
        kernels = kernels_used()
        if kernels != self._kernels:  # which path the sequence mixers took (kernel or torch reference)
            record["kernels"] = self._kernels = kernels
        if rank == 0:
            self._write(trainer, record)

    def on_train_end(self, trainer, pl_module):
        if _world()[1] == 0 and self.loss_curve_png:
            plot_loss_curve(self.path, os.path.join(self.out_dir, "loss_curve.png"))

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _loss(trainer, outputs) -> float:
        value = trainer.callback_metrics.get("reduced_train_loss")
        if value is None and isinstance(outputs, torch.Tensor):
            value = outputs
        return float(value) if value is not None else float("nan")

    @staticmethod
    def _lr(trainer) -> float:
        try:
            return float(trainer.optimizers[0].param_groups[0]["lr"])
        except Exception:
            return float("nan")

    @staticmethod
    def _from_last_rank(record):
        world, rank = _world()
        if world == 1:
            return record
        t = torch.tensor([record["loss"], record["lr"]], dtype=torch.float64, device=_comm_device())
        dist.broadcast(t, src=world - 1)
        return dict(record, loss=t[0].item(), lr=t[1].item())

    def _write(self, trainer, record):
        os.makedirs(self.out_dir, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for logger in trainer.loggers:
            if type(logger).__name__ == "TensorBoardLogger":
                logger.log_metrics({k: v for k, v in record.items() if k not in ("step", "kernels")},
                                   step=record["step"])
        if "kernels" in record:
            print(f"implementations in use (sequence mixers, experts): {', '.join(record['kernels'])}", flush=True)
        moe = f" | moe imbalance {record['moe/imbalance_max']:.2f} entropy {record['moe/entropy_mean']:.3f}" \
            if "moe/imbalance_max" in record else ""
        print(
            f"step {record['step']}/{trainer.max_steps} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
            f"{record['tokens_per_s']:.0f} tok/s | {record['tflops_per_gpu']:.4f} TFLOP/s/GPU{moe}",
            flush=True,
        )


def read_metrics(path: str) -> Dict[int, dict]:
    """step -> record; a step logged twice (rerun after a kill) keeps its latest record."""
    out = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    r = json.loads(line)
                    out[int(r["step"])] = r
    return dict(sorted(out.items()))


def plot_loss_curve(metrics_path: str, png_path: str) -> Optional[str]:
    records = read_metrics(metrics_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(records)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [records[s]["loss"] for s in steps], label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path


class SaveInitialCheckpoint(Callback):
    """Write the weights as they are before the first step (a distributed checkpoint, so a run
    with another parallel layout can start from exactly the same weights via
    ``checkpoint.init_from``)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, trainer, pl_module):
        if trainer.global_step == 0 and not os.path.exists(self.path):
            trainer.save_checkpoint(self.path, weights_only=True)
