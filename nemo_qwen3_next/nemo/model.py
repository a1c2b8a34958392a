"""`Qwen3NextModel` (a NeMo `llm.GPTModel`) and its Hugging Face connectors.

`llm.import_ckpt(model=Qwen3NextModel(cfg), source="hf://<dir>")` and
`llm.export_ckpt(path, target="hf")` both go through the streaming converter in `convert.py`
(the model is never materialised; no trainer is started). The tokenizer comes from the
checkpoint directory only (no hub access).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
from nemo.collections.llm.gpt.model.base import GPTModel
from nemo.lightning import io

from ..config import Qwen3NextConfig
from .config import Qwen3NextNeMoConfig, from_core, qwen3_next_80b_a3b_nemo


class Qwen3NextModel(GPTModel):
    """NeMo 2 Qwen3-Next: `llm.GPTModel` whose config builds our hybrid GDN / gated-attention decoder."""

    def __init__(self, config: Optional[Qwen3NextNeMoConfig] = None, optim=None, tokenizer=None,
                 model_transform: Optional[Callable] = None):
        super().__init__(config or qwen3_next_80b_a3b_nemo(), optim=optim, tokenizer=tokenizer,
                         model_transform=model_transform)


# ---------------------------------------------------------------------- checkpoint context/
def hf_tokenizer(tokenizer_dir: str):
    """NeMo `AutoTokenizer` over the HF tokenizer files in `tokenizer_dir` (local files only)."""
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer

    return AutoTokenizer(os.path.abspath(tokenizer_dir), use_fast=True, trust_remote_code=False)


def copy_tokenizer_files(src: str, dst: str) -> bool:
    """Copy the HF tokenizer files (only those: never weights) of `src` into `dst`; False if none."""
    from .convert import TOKENIZER_FILES

    names = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(src, f))]
    if not any(f in names for f in TOKENIZER_FILES[:6]):
        return False
    os.makedirs(dst, exist_ok=True)
    for f in names:
        shutil.copy(os.path.join(src, f), os.path.join(dst, f))
    return True


def write_context(config: Qwen3NextConfig, hf_dir: str, context_dir: str) -> None:
    """NeMo's `context/` (serialised model config + tokenizer), as `ModelConnector.nemo_save` writes it.

    The tokenizer files are staged in a `nemo_tokenizer` folder first, because NeMo copies the
    tokenizer's whole source directory into `context/` (for a HF directory: the weights too).
    """
    from nemo.lightning import MegatronStrategy, Trainer
    from nemo.lightning.io.pl import TrainerContext

    from .cpu import apply as apply_cpu

    apply_cpu()
    with tempfile.TemporaryDirectory() as tmp:
        staged = os.path.join(tmp, "nemo_tokenizer")
        tokenizer = hf_tokenizer(staged) if copy_tokenizer_files(hf_dir, staged) else None
        model = Qwen3NextModel(from_core(config), tokenizer=tokenizer)
        trainer = Trainer(devices=1, accelerator="cpu",
                          strategy=MegatronStrategy(ckpt_save_optimizer=False, always_save_context=True))
        TrainerContext(model=model, trainer=trainer, extra={}).io_dump(Path(context_dir), yaml_attrs=["model"])


def read_context(context_dir: str) -> Tuple[Qwen3NextNeMoConfig, Optional[str]]:
    """(model config, tokenizer directory or None) of a NeMo checkpoint's `context/`."""
    model = io.load_context(Path(context_dir), subpath="model")
    if not isinstance(model.config, Qwen3NextConfig):
        raise TypeError(f"{context_dir}: the checkpoint holds a {type(model.config).__name__}, not a Qwen3-Next config")
    tok = os.path.join(context_dir, "nemo_tokenizer")
    return model.config, (tok if os.path.isdir(tok) else None)


def load_nemo(path: str, tp: int = 1, pp: int = 1, ep: int = 1, **config_overrides) -> Qwen3NextModel:
    """A `Qwen3NextModel` with the weights of the NeMo checkpoint `path`, at any TP/PP/EP, without a
    trainer (call `init_distributed(tp, pp, ep)` first when running under torchrun)."""
    from megatron.core import dist_checkpointing

    from ..model import init_distributed
    from .convert import NEMO_SHARDED_METADATA, PREFIX
    from .cpu import apply as apply_cpu

    apply_cpu()
    init_distributed(tp, pp, ep)
    model = io.load_context(Path(path) / "context", subpath="model")
    cfg = model.config
    for k, v in dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                     expert_model_parallel_size=ep, perform_initialization=False,
                     use_cpu_initialization=not torch.cuda.is_available(), **config_overrides).items():
        setattr(cfg, k, v)
    if tp > 1 and cfg.num_moe_experts:
        cfg.sequence_parallel = True  # Megatron: MoE with TP > 1 needs sequence parallelism
    model.configure_model()
    sharded = model.module.sharded_state_dict(prefix=PREFIX, metadata=dict(NEMO_SHARDED_METADATA))
    state = dist_checkpointing.load(sharded, str(Path(path) / "weights"))
    missing, unexpected = model.module.load_state_dict(
        {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"{path}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


# ---------------------------------------------------------------------- connectors
@io.model_importer(Qwen3NextModel, "hf")
class HFQwen3NextImporter(io.ModelConnector["AutoModelForCausalLM", Qwen3NextModel]):
    """HF directory -> NeMo checkpoint, streamed tensor by tensor (see `convert.convert_hf_to_nemo`)."""

    def init(self) -> Qwen3NextModel:
        return Qwen3NextModel(self.config, tokenizer=self.tokenizer)

    def apply(self, output_path: Path, dtype: Optional[str] = None) -> Path:
        from .convert import convert_hf_to_nemo

        report = convert_hf_to_nemo(str(self), str(output_path), dtype=dtype, overwrite=True)
        print(report)
        return Path(output_path)

    @property
    def config(self) -> Qwen3NextNeMoConfig:
        from .convert import _hf_dtype, core_config_from_hf_dir

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
        from .convert import convert_nemo_to_hf

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
