"""Open a checkpoint directory for generation: the model (one process) and the text codec beside it.

Layouts recognised, in this order:

* Hugging Face directory: ``config.json`` + ``*.safetensors`` -> `load_hf`; tokenizer files there.
* NeMo 2 checkpoint: ``context/`` + ``weights/`` -> `nemo.load_nemo`; the tokenizer in the context.
* a checkpoint of `examples/pretrain.py` (``weights/`` only: the trainer writes no context) or its run
  directory (then the newest finished ``*-last`` checkpoint): the model config and tokenizer are
  composed again from the run's ``cmd-args.log`` overrides and ``conf/``, at one process
  (``parallelism=single``); the weights load through Megatron's distributed checkpointing.

Anything else is a one-line `CheckpointError`.
"""

from __future__ import annotations

import os
import shlex
from typing import List, Optional

import torch

from ..checkpoint.layout import layout  # noqa: F401 (stdlib-only home, re-exported)

from ..checkpoint import CheckpointError  # stdlib-only: the CLI checks the layout before heavy imports

CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "conf")


class Codec:
    """Text <-> ids for a NeMo tokenizer (``text_to_ids``) or a transformers one (``encode``)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.hf = hasattr(tokenizer, "encode") and hasattr(tokenizer, "decode")
        eos = getattr(tokenizer, "eos_token_id", None) if self.hf else getattr(tokenizer, "eos_id", None)
        self.eos_id: Optional[int] = None if eos is None or eos < 0 else int(eos)

    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text) if self.hf else self.tokenizer.text_to_ids(text)

    def decode(self, ids: List[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.hf else self.tokenizer.ids_to_text(ids)


def load_for_generation(path: str, device: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                        tokenizer: Optional[str] = None):
    """-> ``(GPTModel in eval mode on `device`, Codec or None)``; ``tokenizer="byte"`` or a HF tokenizer
    path overrides the checkpoint's own."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    kind = layout(path)
    tok = None
    if kind == "hf":
        from ..loading import load_hf

        model = load_hf(path, dtype=dtype)
        if any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(path)
    elif kind == "nemo":
        from ..nemo import load_nemo

        nemo_model = load_nemo(path)
        model, tok = nemo_model.module, getattr(nemo_model, "tokenizer", None)
    else:
        if kind == "pretrain_run":
            from ..training.recipe import latest_checkpoint

            found = latest_checkpoint(path)
            if not found:
                raise CheckpointError(f"{path}: the run has no finished checkpoint yet")
            path = found[0]
        model, tok = _load_pretrain_checkpoint(path, on_cpu=not str(device).startswith("cuda"))
    if tokenizer == "byte":
        from ..training.tokenizer import ByteTokenizer

        tok = ByteTokenizer(model.config.vocab_size)
    elif tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    from .generate import unwrap

    model = unwrap(model).to(device=device, dtype=dtype).eval()
    return model, (Codec(tok) if tok is not None else None)


def _load_pretrain_checkpoint(ckpt_dir: str, on_cpu: bool):
    """Model config + tokenizer of the run that wrote `ckpt_dir` (its Hydra overrides), then its weights."""
    from hydra import compose, initialize_config_dir
    from megatron.core import dist_checkpointing
    from omegaconf import OmegaConf

    from ..model import build_model, init_single_process
    from ..training import config as train_config
    from ..training import recipe

    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt_dir)))
    with open(os.path.join(run_dir, "cmd-args.log")) as f:
        args = shlex.split(f.read())[1:]
    config_name, overrides, it = "qwen3_next_tiny", [], iter(args)
    for a in it:
        if a in ("--config-name", "-cn"):
            config_name = next(it, config_name)
        elif a.startswith("--config-name="):
            config_name = a.split("=", 1)[1]
        elif not a.startswith("-") and a != "dry_run=true":
            overrides.append(a)
    with initialize_config_dir(config_dir=os.path.abspath(CONF_DIR), version_base=None):
        cfg = compose(config_name=config_name, overrides=overrides + ["parallelism=single"])
    tc = train_config.validate(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False), 1)
    mcfg = recipe.model_config(tc, on_cpu)
    init_single_process()
    model = build_model(mcfg, backend="local")
    weights = os.path.join(ckpt_dir, "weights")
    sharded = model.sharded_state_dict(prefix="module.", metadata=dist_checkpointing.load_content_metadata(weights))
    state = dist_checkpointing.load(sharded, weights)
    missing, unexpected = model.load_state_dict(
        {k[len("module."):]: v for k, v in state.items() if k.startswith("module.")}, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt_dir}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model, recipe.tokenizer(tc, mcfg.vocab_size)
