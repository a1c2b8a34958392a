"""Where a training step's time goes: GPU busy versus idle, and what the CPU did meanwhile.

`StepProfiler` (a Lightning callback, `logging.profile_steps=[start, stop]` in `examples/pretrain.py`)
records steps ``start..stop-1`` with torch.profiler (CPU ops + CUDA kernels), then the same number of
steps with cProfile (Python functions: the NeMo/Lightning/Megatron code between kernels, which the
torch profiler does not name), and writes ``<run_dir>/profile/``:

* ``steps_<a>-<b>.txt``: kernels by CUDA time, ops by self CPU time, and the idle-gap summary;
* ``gaps_<a>-<b>.json``: `gpu_gaps`' numbers (per-step wall, GPU busy, idle, the largest gaps and the
  CPU ops that ran during them);
* ``python_<c>-<d>.txt``: cProfile's functions by cumulative and by own time.

The bare-step benchmark (`examples/bench_model.py --profile`) writes the same gap summary, so the NeMo
loop and the bare step are compared on one measure: the GPU's idle time per step.
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch


def _intervals(events) -> Tuple[List[Tuple[float, float]], list]:
    """(kernel [start, end] intervals in us, top-level CPU ops) of a profiler's events."""
    kernels, cpu_top = [], []
    for e in events:
        dev = getattr(e, "device_type", None)
        name = str(dev).rsplit(".", 1)[-1]
        if name in ("CUDA", "PrivateUse1"):
            kernels.append((e.time_range.start, e.time_range.end))
        elif name == "CPU" and getattr(e, "cpu_parent", None) is None:
            cpu_top.append(e)
    return kernels, cpu_top


def _merge(iv: List[Tuple[float, float]]) -> List[Tuple[float, float]]:
    out: List[list] = []
    for s, e in sorted(iv):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def gpu_gaps(events, steps: int, window: Optional[Tuple[float, float]] = None, min_gap_us: float = 200.0,
             top: int = 15) -> dict:
    """GPU busy and idle time over the profiled window, per step, and the largest idle gaps.

    ``window``: (start, end) in the events' clock (us); default from the first to the last event.
    Each gap lists the top-level CPU ops (aten calls, record_function ranges) that overlapped it, by
    overlap: what the host was doing while the GPU waited. Idle time with no op is Python (see the
    cProfile table)."""
    kernels, cpu_top = _intervals(events)
    busy = _merge(kernels)
    if window is None:
        starts = [e.time_range.start for e in events] or [0.0]
        ends = [e.time_range.end for e in events] or [0.0]
        window = (min(starts), max(ends))
    w0, w1 = window
    busy = [(max(s, w0), min(e, w1)) for s, e in busy if e > w0 and s < w1]
    busy_us = sum(e - s for s, e in busy)
    gaps = []
    prev = w0
    for s, e in busy + [(w1, w1)]:
        if s - prev >= min_gap_us:
            gaps.append((prev, s))
        prev = max(prev, e)
    by_op: Dict[str, float] = defaultdict(float)
    listed = []
    for g0, g1 in sorted(gaps, key=lambda g: g[0] - g[1])[:top]:
        ops: Dict[str, float] = defaultdict(float)
        for ev in cpu_top:
            o = min(g1, ev.time_range.end) - max(g0, ev.time_range.start)
            if o > 0:
                ops[ev.name] += o
        listed.append(dict(start_ms=round((g0 - w0) / 1e3, 3), ms=round((g1 - g0) / 1e3, 3),
                           cpu_ops_ms={k: round(v / 1e3, 3) for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:5]}))
    for g0, g1 in gaps:
        for ev in cpu_top:
            o = min(g1, ev.time_range.end) - max(g0, ev.time_range.start)
            if o > 0:
                by_op[ev.name] += o
    wall = w1 - w0
    idle = sum(g1 - g0 for g0, g1 in gaps)
    steps = max(1, steps)
    return dict(steps=steps, wall_ms_per_step=round(wall / 1e3 / steps, 3),
                gpu_busy_ms_per_step=round(busy_us / 1e3 / steps, 3),
                gpu_idle_ms_per_step=round((wall - busy_us) / 1e3 / steps, 3),
                idle_in_gaps_over_min_ms_per_step=round(idle / 1e3 / steps, 3), min_gap_us=min_gap_us,
                gaps_over_min=len(gaps), largest_gaps=listed,
                idle_cpu_ops_ms_per_step={k: round(v / 1e3 / steps, 3) for k, v in
                                          sorted(by_op.items(), key=lambda kv: -kv[1])[:25]})


def tables(prof, gaps: dict) -> str:
    """The text report: kernels by CUDA time, ops by self CPU time, then the gap summary."""
    out = io.StringIO()
    avg = prof.key_averages()
    out.write(f"{gaps['steps']} steps\n\nby CUDA time\n")
    out.write(avg.table(sort_by="cuda_time_total", row_limit=60, max_name_column_width=90))
    out.write("\n\nby self CPU time\n")
    out.write(avg.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=90))
    out.write("\n\nGPU idle gaps\n" + json.dumps(gaps, indent=1) + "\n")
    return out.getvalue()


def python_table(pr: cProfile.Profile, limit: int = 60) -> str:
    out = io.StringIO()
    st = pstats.Stats(pr, stream=out)
    st.sort_stats("cumulative").print_stats(limit)
    st.sort_stats("tottime").print_stats(limit)
    return out.getvalue()


def _write(path: str, text: str) -> None:
    """Temp file + rename: a killed run leaves no half-written report."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class StepProfiler:
    """Profiles optimizer steps ``start..stop-1`` (torch.profiler), then as many with cProfile; rank 0
    writes ``<out_dir>/``. Steps count like ``trainer.global_step`` at the batch's start."""

    def __init__(self, out_dir: str, start: int, stop: int):
        if not (0 <= start < stop):
            raise ValueError(f"logging.profile_steps = [{start}, {stop}] must be [start, stop] with 0 <= start < stop")
        self.out_dir, self.start, self.stop = out_dir, start, stop
        self.py_stop = stop + (stop - start)
        self._prof = None
        self._py: Optional[cProfile.Profile] = None
        self.written: List[str] = []

    def _rank0(self) -> bool:
        return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0

    def batch_start(self, step: int) -> None:
        if step == self.start:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._prof = profile(activities=acts)
            self._prof.__enter__()
        elif step == self.stop and self._py is None:
            self._py = cProfile.Profile()
            self._py.enable()

    def batch_end(self, step_done: int) -> None:
        """``step_done``: the step that just ended (global_step before the batch)."""
        if self._prof is not None and step_done == self.stop - 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._prof.__exit__(None, None, None)
            prof, self._prof = self._prof, None
            if self._rank0():
                os.makedirs(self.out_dir, exist_ok=True)
                gaps = gpu_gaps(prof.events(), self.stop - self.start)
                tag = f"{self.start}-{self.stop}"
                for name, text in ((f"steps_{tag}.txt", tables(prof, gaps)), (f"gaps_{tag}.json", json.dumps(gaps, indent=1))):
                    _write(os.path.join(self.out_dir, name), text)
                    self.written.append(os.path.join(self.out_dir, name))
        if self._py is not None and step_done == self.py_stop - 1:
            self._py.disable()
            pr, self._py = self._py, None
            if self._rank0():
                os.makedirs(self.out_dir, exist_ok=True)
                path = os.path.join(self.out_dir, f"python_{self.stop}-{self.py_stop}.txt")
                _write(path, python_table(pr))
                self.written.append(path)
