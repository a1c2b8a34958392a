"""Which checkpoint layout a directory holds (HF, NeMo 2, a pretrain run or one of its checkpoints), stdlib
only, so a CLI refuses an unknown path before torch is imported."""

from __future__ import annotations

import os

from .errors import CheckpointError


def layout(path: str) -> str:
    """``"hf"``, ``"nemo"``, ``"pretrain"`` or ``"pretrain_run"``; `CheckpointError` otherwise."""
    has = lambda *p: os.path.exists(os.path.join(path, *p))  # noqa: E731
    if os.path.isdir(path):
        if has("config.json") and (any(f.endswith(".safetensors") for f in os.listdir(path))
                                   or has("model.safetensors.index.json")):
            return "hf"
        if has("context") and has("weights"):
            return "nemo"
        if has("weights", "metadata.json") and has("..", "..", "cmd-args.log"):
            return "pretrain"
        if has("checkpoints") and has("cmd-args.log"):
            return "pretrain_run"
    raise CheckpointError(
        f"{path}: unknown checkpoint layout; give a Hugging Face directory (config.json + *.safetensors), "
        "a NeMo 2 checkpoint (context/ + weights/), or an examples/pretrain.py run directory or one of its "
        "checkpoints/<name> directories"
    )
