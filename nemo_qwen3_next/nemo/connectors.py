"""Hugging Face connectors of `Qwen3NextModel`: `llm.import_ckpt(model=Qwen3NextModel(cfg),
source="hf://<dir>")` and `llm.export_ckpt(path, target="hf")`.

Both go through the streaming converter in `convert.py` (the model is never materialised; no
trainer is started). The tokenizer comes from the checkpoint directory only (no hub access).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

import torch
from nemo.lightning import io

from .config import Qwen3NextNeMoConfig, from_core
from .context import copy_tokenizer_files, hf_tokenizer, read_context
from .convert import _hf_dtype, convert_hf_to_nemo, convert_nemo_to_hf, core_config_from_hf_dir
from .model import Qwen3NextModel


@io.model_importer(Qwen3NextModel, "hf")
class HFQwen3NextImporter(io.ModelConnector["AutoModelForCausalLM", Qwen3NextModel]):
    """HF directory -> NeMo checkpoint, streamed tensor by tensor (see `convert.convert_hf_to_nemo`)."""

    def init(self) -> Qwen3NextModel:
        return Qwen3NextModel(self.config, tokenizer=self.tokenizer)

    def apply(self, output_path: Path, dtype: Optional[str] = None) -> Path:
        report = convert_hf_to_nemo(str(self), str(output_path), dtype=dtype, overwrite=True)
        print(report)
        return Path(output_path)

    @property
    def config(self) -> Qwen3NextNeMoConfig:
        return from_core(core_config_from_hf_dir(str(self), _hf_dtype(str(self))))

    @property
    def tokenizer(self):
        with tempfile.TemporaryDirectory() as tmp:
            staged = os.path.join(tmp, "nemo_tokenizer")
            if not copy_tokenizer_files(str(self), staged):
                return None
            return hf_tokenizer(staged)


@io.model_exporter(Qwen3NextModel, "hf")
class HFQwen3NextExporter(io.ModelConnector[Qwen3NextModel, "AutoModelForCausalLM"]):
    """NeMo checkpoint -> HF directory, streamed tensor by tensor (see `convert.convert_nemo_to_hf`)."""

    def init(self, dtype=torch.bfloat16):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(self.config, torch_dtype=dtype)

    def nemo_load(self, path, trainer=None, cpu=True):
        """Materialise the model with a trainer: only for ModelOpt (quantised) checkpoints.

        `llm.export_ckpt(target="hf")` first calls this to ask whether the checkpoint is a ModelOpt
        one; a RuntimeError sends it down the streaming route instead of loading 80B parameters."""
        if not (Path(path) / "weights" / "modelopt_state").exists():
            raise RuntimeError(f"{path} is not a ModelOpt checkpoint; Qwen3-Next exports stream (see convert.py)")
        return super().nemo_load(path, trainer=trainer, cpu=cpu)

    def apply(self, output_path: Path, **kwargs) -> Path:
        print(convert_nemo_to_hf(str(self), str(output_path), overwrite=True))
        return Path(output_path)

    @property
    def config(self):
        from transformers import Qwen3NextConfig as HFConfig

        cfg, _ = read_context(str(Path(str(self)) / "context"))
        return HFConfig(**cfg.to_hf_dict())

    @property
    def tokenizer(self):
        return io.load_context(Path(str(self)) / "context", subpath="model").tokenizer
