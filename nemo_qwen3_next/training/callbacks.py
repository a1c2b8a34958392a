"""Lightning callbacks for pretraining: throughput and step timing, progress bar, MoE expert load,
validation loss, loss-curve PNG, closing summary.

`TrainingMetrics` owns one record per logged optimizer step (loss, lr, tokens/s, TFLOP/s per GPU, MoE
load, val_loss after a validation), prints a progress line (or feeds `ProgressBar`), writes TensorBoard
scalars and appends the record to ``<run_dir>/metrics/metrics.jsonl`` (the loss curve a resumed run
continues; a directory, because NeMo moves the files at the top of a run directory into ``run_N/`` when
a run restarts). Every rank runs the callback; the few collectives it issues (broadcasts, one
all-reduce) are called by all ranks at the same steps, never by rank 0 alone.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from typing import Dict, Optional

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

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


def _cuda_sync() -> None:
    """Step times on GPU are the work's, not the launches': wait for the queue to drain."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


class TrainingMetrics(Callback):
    """Per-step timing (CUDA-synchronised on GPU) and the run's record: metrics.jsonl, TensorBoard,
    the console (a line per logged step, or the progress bar's fields), validation loss, the loss
    PNG and the closing summary (also ``metrics/summary.json``).

    metrics.jsonl holds one record per logged step: a resumed run first drops the records past its
    checkpoint (they are logged again), and a validation adds ``val_loss`` to its step's record. The
    throughput summary is the median over this process's steps after `warmup_steps` (the first steps
    hold kernel compilation: its time is reported separately as ``first_step_time_s``)."""

    def __init__(self, run_dir: str, tokens_per_step: int, flops_per_step: float, log_every_n_steps: int = 1,
                 metrics_file: str = "metrics.jsonl", moe_layers: int = 0, num_experts: int = 0,
                 loss_curve_png: bool = True, warmup_steps: int = 5, print_lines: bool = True,
                 title: str = "", model_line=None, on_end=None, mtp_layers: int = 0):
        self.run_dir = run_dir
        self.out_dir = os.path.join(run_dir, "metrics")
        self.path = os.path.join(self.out_dir, metrics_file)
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_step
        self.every = max(1, log_every_n_steps)
        self.expert_load = ExpertLoad(moe_layers, num_experts) if num_experts else None
        self.loss_curve_png = loss_curve_png
        self.warmup_steps = warmup_steps
        self.print_lines = print_lines
        self.title = title
        self.model_line = model_line  # (pl_module) -> str, printed once at the start
        self.on_end = on_end  # () -> [extra summary lines]
        self.latest: Dict[str, float] = {}  # the last logged record (the progress bar shows it)
        self.step_spans: list = []  # (start, end) perf_counter of every step this process ran
        self._t0: Optional[float] = None
        self._elapsed = 0.0
        self._steps = 0
        self._kernels: Optional[list] = None
        self._start_step = 0
        self._last_offset: Optional[int] = None  # where the last written record starts in metrics.jsonl
        self._logged_step: Optional[int] = None  # step of the last record (known on every rank)
        self._val: Optional[tuple] = None  # (step, val_loss) of the latest validation
        self.mtp_layers = mtp_layers  # MTP depths whose loss is logged (`modules.mtp.MTPLossTracker`)
        self._mtp: Dict[int, float] = {}  # the latest step's MTP loss per depth, this rank

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer, pl_module):
        if self.expert_load is not None:
            self.expert_load.attach(pl_module)
        self._start_step = trainer.global_step
        if _world()[1] == 0:
            drop_records_after(self.path, self._start_step)  # a resumed run logs these steps again
            if self.model_line is not None:
                _say(self.model_line(pl_module))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        _cuda_sync()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        _cuda_sync()
        end = time.perf_counter()
        start = self._t0 or end
        dt = end - start
        self.step_spans.append((start, end))
        if len(self.step_spans) == 1 and _world()[1] == 0:  # on GPU: kernel compilation on a cold cache
            _say(f"first step of this process: {dt:.1f} s")
        self._elapsed += dt
        self._steps += 1
        if self.mtp_layers:  # one optimizer step's microbatches; read every step, logged like the loss
            from ..modules.mtp import MTPLossTracker

            self._mtp = {d: float(v) for d, v in MTPLossTracker.pop().items()}
        step = trainer.global_step
        if step % self.every and step < trainer.max_steps:
            return
        self._log(trainer, self._record(trainer, outputs))

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get("val_loss")
        t = torch.tensor([float(value) if value is not None else float("nan")], dtype=torch.float64,
                         device=_comm_device())
        world, rank = _world()
        if world > 1:  # the loss lives on the last pipeline stage
            dist.broadcast(t, src=world - 1)
        step, val = trainer.global_step, t.item()
        self._val = (step, val)
        merge = self._logged_step == step  # the step's record is the file's last: add val_loss to it
        record = dict(self.latest if merge else self._record(trainer, None), val_loss=val)
        self.latest, self._logged_step = record, step
        if rank == 0:
            self._write(trainer, record, replace_last=merge)
            _say(f"validation at step {step}/{trainer.max_steps} | val loss {val:.4f}")

    def on_train_end(self, trainer, pl_module):
        if _world()[1] != 0:
            return
        summary = self.summary(trainer)
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        timing = {f"timing/{k}": summary[k] for k in ("first_step_time_s", "median_step_time_s",
                                                       "median_tokens_per_s", "median_tflops_per_gpu")
                  if summary.get(k) is not None}
        for logger in trainer.loggers:
            if type(logger).__name__ == "TensorBoardLogger" and timing:
                logger.log_metrics(timing, step=trainer.global_step)
        png = None
        if self.loss_curve_png:
            png = plot_loss_curve(self.path, os.path.join(self.out_dir, "loss_curve.png"), self.title)
        if isinstance(trainer.progress_bar_callback, ProgressBar):  # its last refresh before the summary
            trainer.progress_bar_callback.train_progress_bar.close()
        _say(summary_text(summary, png, self.on_end() if self.on_end else []))

    # ------------------------------------------------------------------ timing summary
    def summary(self, trainer) -> dict:
        """Steps, final losses and the median step time / tokens/s over the steps after warm-up."""
        times = [end - start for start, end in self.step_spans]
        measured = times[self.warmup_steps:]
        out = {"run_dir": self.run_dir, "first_step": self._start_step + 1, "last_step": trainer.global_step,
               "max_steps": trainer.max_steps, "loss": self.latest.get("loss"),
               "loss_step": self.latest.get("step"),
               "val_loss": self._val[1] if self._val else None, "val_loss_step": self._val[0] if self._val else None,
               "first_step_time_s": times[0] if times else None, "warmup_steps": self.warmup_steps,
               "measured_steps": len(measured), "tokens_per_step": self.tokens_per_step}
        if measured:
            med = statistics.median(measured)
            out.update(median_step_time_s=med, median_tokens_per_s=self.tokens_per_step / med,
                       median_tflops_per_gpu=self.flops_per_step / med / _world()[0] / 1e12)
            # what the run really sustained: first measured step's start to the last one's end, so the
            # loop's work between steps (logging, callbacks, validation, checkpoints) counts too
            spans = self.step_spans[self.warmup_steps:]
            wall = (spans[-1][1] - spans[0][0]) / len(spans)
            out.update(wall_step_time_s=wall, wall_tokens_per_s=self.tokens_per_step / wall)
        return out

    # ------------------------------------------------------------------ helpers
    def _record(self, trainer, outputs) -> dict:
        """The step's record over the steps since the last one; every rank calls it (collectives)."""
        world, _ = _world()
        step = trainer.global_step
        record = {"step": step, "loss": self._loss(trainer, outputs), "lr": self._lr(trainer)}
        record = self._from_last_rank(record)  # the loss lives on the last pipeline stage
        record.update(self._mtp_losses())
        if self._steps:
            secs = self._elapsed / self._steps
            record["step_time_s"] = secs
            record["tokens_per_s"] = self.tokens_per_step / secs
            record["tflops_per_gpu"] = self.flops_per_step / secs / world / 1e12
            record["eta_s"] = secs * max(0, trainer.max_steps - step)
        self._elapsed, self._steps = 0.0, 0
        if self.expert_load is not None:
            record.update(self.expert_load.collect())
        kernels = kernels_used()
        if kernels != self._kernels:  # which path the sequence mixers took (kernel or torch reference)
            record["kernels"] = self._kernels = kernels
        return record

    def _log(self, trainer, record):
        self.latest, self._logged_step = record, record["step"]
        if _world()[1] != 0:
            return
        self._write(trainer, record)
        if "kernels" in record:
            _say(f"implementations in use (sequence mixers, experts): {', '.join(record['kernels'])}")
        if self.print_lines and "tokens_per_s" in record:
            moe = f" | moe imbalance {record['moe/imbalance_max']:.2f} entropy {record['moe/entropy_mean']:.3f}" \
                if "moe/imbalance_max" in record else ""
            mtp = f" | mtp loss {record['mtp_loss']:.4f}" if "mtp_loss" in record else ""
            _say(f"step {record['step']}/{trainer.max_steps} | loss {record['loss']:.4f}{mtp} | lr {record['lr']:.3e} | "
                 f"{record['tokens_per_s']:.0f} tok/s | {record['tflops_per_gpu']:.4f} TFLOP/s/GPU{moe} | "
                 f"eta {format_seconds(record['eta_s'])}")

    def _write(self, trainer, record, replace_last: bool = False):
        os.makedirs(self.out_dir, exist_ok=True)
        with open(self.path, "a") as f:
            if replace_last and self._last_offset is not None:
                f.truncate(self._last_offset)
            self._last_offset = f.tell()
            f.write(json.dumps(record) + "\n")
        for logger in trainer.loggers:  # val_loss reaches TensorBoard through NeMo's own self.log
            if type(logger).__name__ == "TensorBoardLogger" and not replace_last:
                logger.log_metrics({k: v for k, v in record.items() if k not in ("step", "kernels", "val_loss")},
                                   step=record["step"])

    @staticmethod
    def _loss(trainer, outputs) -> float:
        value = trainer.callback_metrics.get("reduced_train_loss")
        if value is None and isinstance(outputs, torch.Tensor):
            value = outputs
        return float(value) if value is not None else float("nan")

    def _mtp_losses(self) -> Dict[str, float]:
        """``mtp_loss`` (depth 1; ``mtp_<d>_loss`` beyond): the step's MTP loss averaged over data-parallel
        ranks, from the last pipeline stage (every rank calls this: collectives)."""
        if not self.mtp_layers:
            return {}
        t = torch.tensor([self._mtp.get(d, float("nan")) for d in range(self.mtp_layers)], dtype=torch.float64,
                         device=_comm_device())
        world, _ = _world()
        if world > 1:
            from megatron.core import parallel_state

            dp = parallel_state.get_data_parallel_group(with_context_parallel=True)
            dist.all_reduce(t, group=dp)
            t /= dist.get_world_size(dp)
            dist.broadcast(t, src=world - 1)
        return {("mtp_loss" if d == 0 else f"mtp_{d + 1}_loss"): t[d].item() for d in range(self.mtp_layers)}

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


def _say(msg: str) -> None:
    """Print above an active progress bar (tqdm.write), else a plain line."""
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stdout)
    sys.stdout.flush()


def summary_text(s: dict, png: Optional[str], extra=()) -> str:
    """The closing summary: what ran, where it ended, how fast, where the outputs are."""
    run = s["run_dir"]
    lines = [f"done: steps {s['first_step']}-{s['last_step']} of {s['max_steps']}"
             + (f" | train loss {s['loss']:.4f} (step {s['loss_step']})" if s.get("loss") is not None else "")
             + (f" | val loss {s['val_loss']:.4f} (step {s['val_loss_step']})" if s.get("val_loss") is not None else "")]
    if s.get("median_step_time_s"):
        lines.append(f"speed: median step {s['median_step_time_s'] * 1e3:.1f} ms = {s['median_tokens_per_s']:.0f} tokens/s, "
                     f"{s['median_tflops_per_gpu']:.3f} TFLOP/s/GPU over {s['measured_steps']} steps after "
                     f"{s['warmup_steps']} warm-up; first step {s['first_step_time_s']:.1f} s (compilation, warm-up)")
        if s.get("wall_tokens_per_s"):
            lines.append(f"wall clock: {s['wall_step_time_s'] * 1e3:.1f} ms per step = {s['wall_tokens_per_s']:.0f} "
                         "tokens/s with the loop's work between steps (logging, validation, checkpoints)")
    elif s.get("first_step_time_s") is not None:
        lines.append(f"speed: first step {s['first_step_time_s']:.1f} s; too few steps after {s['warmup_steps']} "
                     "warm-up for a median (raise trainer.max_steps)")
    lines += [f"checkpoints: {os.path.join(run, 'checkpoints')}",
              f"tensorboard: tensorboard --logdir {os.path.join(run, 'tensorboard')}",
              f"metrics: {os.path.join(run, 'metrics', 'metrics.jsonl')} (summary.json beside it)"
              + (f" | plot: {png}" if png else "")]
    return "\n".join(lines + list(extra))


def drop_records_after(path: str, step: int) -> None:
    """Keep only the records up to `step` (atomically): a run resumed from step N logs N+1.. again."""
    if not os.path.exists(path):
        return

    def keep(line):
        try:
            return int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill
            return False

    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if keep(line)]
    if len(kept) != len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


class ProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar counted in optimizer steps (from the resumed step to max_steps, so its ETA
    is right after a resume), showing `TrainingMetrics.latest`: loss, lr, tokens/s, TFLOP/s/GPU."""

    BAR_FORMAT = "{desc} {n_fmt}/{total_fmt} |{bar:20}| [{elapsed}<{remaining}{postfix}]"

    def __init__(self, metrics: TrainingMetrics):
        super().__init__()
        self.metrics = metrics

    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        bar.bar_format, bar.smoothing = self.BAR_FORMAT, 0.3  # ETA from recent steps, not the first one
        return bar

    def on_train_epoch_start(self, trainer, *_):
        self.train_progress_bar.reset(trainer.max_steps)
        self.train_progress_bar.initial = self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description("train")

    def on_train_batch_end(self, trainer, pl_module, *_, **__):
        bar = self.train_progress_bar
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.update(trainer.global_step - bar.n)

    def get_metrics(self, trainer, pl_module):
        r = self.metrics.latest
        if "tokens_per_s" not in r:
            return {}
        return {"loss": f"{r['loss']:.4f}", "lr": f"{r['lr']:.2e}", "tok/s": f"{r['tokens_per_s']:.0f}",
                "TFLOP/s/GPU": f"{r['tflops_per_gpu']:.3g}"}


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


def loss_figure(records: Dict[int, dict], title: str = ""):
    """Train loss and validation loss (left axis), learning rate (right axis), titled with the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    train = [(s, r["loss"]) for s, r in records.items() if "loss" in r]
    val = [(s, r["val_loss"]) for s, r in records.items() if "val_loss" in r]
    lr = [(s, r["lr"]) for s, r in records.items() if "lr" in r]
    handles = ax.plot(*zip(*train), label="train loss") if train else []
    if val:
        handles += ax.plot(*zip(*val), "o-", color="tab:orange", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if lr:
        ax_lr = ax.twinx()
        handles += ax_lr.plot(*zip(*lr), "--", color="tab:gray", alpha=0.7, label="learning rate")
        ax_lr.set_ylabel("learning rate")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.legend(handles=handles, labels=[h.get_label() for h in handles], loc="upper right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_loss_curve(metrics_path: str, png_path: str, title: str = "") -> Optional[str]:
    records = read_metrics(metrics_path)
    if not records:
        return None
    import matplotlib.pyplot as plt

    fig = loss_figure(records, title)
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


class ProfileSteps(Callback):
    """`logging.profile_steps`: hands each step's start and end to `profiling.StepProfiler`."""

    def __init__(self, profiler):
        self.profiler = profiler
        self._step = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = trainer.global_step
        self.profiler.batch_start(self._step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._step is not None:
            self.profiler.batch_end(self._step)
