"""The generation settings and checkpoint-layout checks, stdlib only: `examples/generate.py` answers a bad
argument or path in well under a second, before torch and megatron-core are imported."""

from __future__ import annotations

import os
from typing import Optional

from ..checkpoint.errors import CheckpointError


def check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """One-line errors for settings outside their definitions."""
    if temperature < 0:
        raise ValueError(f"temperature = {temperature}: use 0 (greedy) or a positive value")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k = {top_k}: use a positive integer or None")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p = {top_p}: must lie in (0, 1]")


def check_speculative(k, temperature: float, batch: int) -> None:
    """One-line errors for speculation settings this implementation does not cover."""
    if int(k) != k or k < 1:
        raise ValueError(f"speculative_k = {k}: use a positive integer (tokens drafted per round) or None")
    if temperature != 0:
        raise ValueError(f"speculative decoding is greedy only: temperature = {temperature}, use 0 or "
                         "speculative_k=None")
    if batch != 1:
        raise ValueError(f"speculative decoding supports batch 1: got {batch} prompts; generate them one by one "
                         "or use speculative_k=None")


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
