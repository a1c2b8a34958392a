"""A NeMo checkpoint's ``context/`` (serialised model config + tokenizer) and the HF files carried beside it.

Lives apart from `model.py` so the converter can write and read contexts without importing the
connectors (which import the converter): `convert.py` -> `context.py` -> `model.py`, no circle.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

from ..checkpoint import CheckpointError
from ..config import Qwen3NextConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")
# Files of a HF directory that are weights or that the converter writes itself: never carried as-is.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
GENERATED_FILES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def hf_tokenizer(tokenizer_dir: str):
    """NeMo `AutoTokenizer` over the HF tokenizer files in `tokenizer_dir` (local files only)."""
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer

    return AutoTokenizer(os.path.abspath(tokenizer_dir), use_fast=True, trust_remote_code=False)


def copy_tokenizer_files(src: str, dst: str) -> bool:
    """Copy the HF tokenizer files (only those: never weights) of `src` into `dst`; False if none."""
    names = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(src, f))]
    if not any(f in names for f in TOKENIZER_FILES[:6]):
        return False
    os.makedirs(dst, exist_ok=True)
    for f in names:
        shutil.copy(os.path.join(src, f), os.path.join(dst, f))
    return True


def non_weight_files(hf_dir: str) -> List[str]:
    """Top-level files of a HF directory an export must give back unchanged (generation_config.json,
    tokenizer files, README, LICENSE ...): everything except weights, indexes, config.json, hidden files."""
    return sorted(fn for fn in os.listdir(hf_dir)
                  if os.path.isfile(os.path.join(hf_dir, fn)) and not fn.startswith(".")
                  and not fn.endswith(WEIGHT_SUFFIXES) and fn not in GENERATED_FILES)


def copy_files(src: str, names: List[str], dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for fn in names:
        shutil.copy2(os.path.join(src, fn), os.path.join(dst, fn))


def write_context(config: Qwen3NextConfig, hf_dir: str, context_dir: str) -> None:
    """NeMo's `context/` (serialised model config + tokenizer), as `ModelConnector.nemo_save` writes it.

    The tokenizer files are staged in a `nemo_tokenizer` folder first, because NeMo copies the
    tokenizer's whole source directory into `context/` (for a HF directory: the weights too).
    """
    from nemo.lightning import MegatronStrategy, Trainer
    from nemo.lightning.io.pl import TrainerContext

    from .config import from_core
    from .cpu import apply as apply_cpu
    from .model import Qwen3NextModel

    apply_cpu()
    with tempfile.TemporaryDirectory() as tmp:
        staged = os.path.join(tmp, "nemo_tokenizer")
        tokenizer = hf_tokenizer(staged) if copy_tokenizer_files(hf_dir, staged) else None
        model = Qwen3NextModel(from_core(config), tokenizer=tokenizer)
        trainer = Trainer(devices=1, accelerator="cpu",
                          strategy=MegatronStrategy(ckpt_save_optimizer=False, always_save_context=True))
        TrainerContext(model=model, trainer=trainer, extra={}).io_dump(Path(context_dir), yaml_attrs=["model"])


def read_context(context_dir: str) -> Tuple[Qwen3NextConfig, Optional[str]]:
    """(model config, tokenizer directory or None) of a NeMo checkpoint's `context/`.

    Any failure to deserialise (damaged io.json, a class that no longer exists) is one
    `CheckpointError` naming the directory."""
    from nemo.lightning import io

    try:
        model = io.load_context(Path(context_dir), subpath="model")
    except Exception as e:
        raise CheckpointError(f"{context_dir} cannot be loaded ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                              f"the checkpoint's context/ is damaged; convert or save it again") from None
    if not isinstance(getattr(model, "config", None), Qwen3NextConfig):
        raise CheckpointError(f"{context_dir}: the checkpoint holds a {type(getattr(model, 'config', model)).__name__}, "
                              f"not a Qwen3-Next config")
    tok = os.path.join(context_dir, "nemo_tokenizer")
    return model.config, (tok if os.path.isdir(tok) else None)
