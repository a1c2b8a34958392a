"""What a (re)run of `examples/pretrain.py` does: resume, start fresh or nothing to do.

Stdlib only (it reads checkpoint directory names), so the CLI answers a finished run's rerun
before torch / Megatron / NeMo are imported.
"""

from __future__ import annotations

import os
import re
from typing import Optional, Tuple

from .config import PretrainConfig


def latest_checkpoint(run_dir: str) -> Optional[Tuple[str, Optional[int]]]:
    """The checkpoint NeMo's `AutoResume` resumes from (the newest finished ``*last`` directory in
    ``run_dir/checkpoints``; unfinished ones carry a ``<name>-unfinished`` marker) and the optimizer
    steps it holds: its name's ``step=`` is the step index NeMo logged, counted from 0."""
    try:
        entries = [e for e in os.scandir(os.path.join(run_dir, "checkpoints"))
                   if e.is_dir() and e.name.endswith("last") and not os.path.exists(e.path + "-unfinished")]
    except FileNotFoundError:
        return None
    if not entries:
        return None
    newest = max(entries, key=lambda e: e.stat(follow_symlinks=False).st_mtime)
    m = re.match(r"step=(\d+)", newest.name)
    return newest.path, int(m.group(1)) + 1 if m else None


def plan(cfg: PretrainConfig) -> Tuple[str, bool]:
    """What this (re)run does, as one line, and whether there is anything to train."""
    found = latest_checkpoint(cfg.run_dir) if cfg.checkpoint.resume else None
    max_steps = cfg.trainer.max_steps
    if found:
        path, steps = found
        if steps is not None and steps >= max_steps:
            return (f"{cfg.run_dir}: latest checkpoint is step {steps} >= max_steps {max_steps}; nothing to do "
                    "— pass a new name= or raise max_steps", False)
        return f"resuming {cfg.run_dir} from step {steps} ({os.path.basename(path)}) to max_steps {max_steps}", True
    line = f"starting fresh: {cfg.run_dir}, {max_steps} steps"
    if cfg.checkpoint.init_from:
        line += f", from the weights in {cfg.checkpoint.init_from} (optimizer fresh)"
    elif not cfg.checkpoint.resume and latest_checkpoint(cfg.run_dir):
        line += " (checkpoint.resume=false: the checkpoints already there are not used)"
    return line, True
