"""`load_hf`: a Hugging Face Qwen3-Next (directory or in-memory model) as our Megatron `GPTModel`.

For quick checks in one plain Python process (CPU or one GPU); multi-GPU training goes through
the NeMo checkpoint conversion instead. Weights stream from safetensors one tensor at a time.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Callable, Dict, Iterable, Optional, Union

import torch

from .config import Qwen3NextConfig
from .hf_mapping import skipped_hf_names, weight_plan
from .model import build_model, init_single_process


class CheckpointError(ValueError):
    """A checkpoint tensor is missing, unexpected or misshapen; the message names it."""


def safetensors_index(path: str) -> Dict[str, str]:
    """tensor name -> file, for a HF directory (sharded with an index, or one file)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    from safetensors import safe_open

    out = {}
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files and no model.safetensors.index.json")
    for fn in files:
        with safe_open(fn, "pt") as f:
            out.update({k: fn for k in f.keys()})
    return out


class SafetensorsReader:
    """Lazy name -> tensor access over a HF directory; keeps at most one file handle open."""

    def __init__(self, path: str):
        self.index = safetensors_index(path)
        self._file, self._handle = None, None

    def keys(self) -> Iterable[str]:
        return self.index.keys()

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        fn = self.index.get(name)
        if fn is None:
            raise CheckpointError(f"checkpoint tensor {name!r} is missing")
        if fn != self._file:
            self._file, self._handle = fn, safe_open(fn, "pt")
        return self._handle.get_tensor(name)


def load_weights(model, get_hf: Callable[[str], torch.Tensor], hf_names: Iterable[str], config,
                 dtype: Optional[torch.dtype] = None) -> None:
    """Fill every parameter of `model` (TP=1) from HF tensors, checking names and shapes."""
    ours = model.state_dict()
    plan = weight_plan(config, expert_layout=_expert_layout(ours))
    hf_names = set(hf_names)
    needed = {n for e in plan for n in e.hf}
    missing = sorted(needed - hf_names)
    if missing:
        raise CheckpointError(f"checkpoint tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    unknown = sorted(hf_names - needed - set(skipped_hf_names(hf_names, config)))
    if unknown:
        raise CheckpointError(
            f"checkpoint has unexpected tensor {unknown[0]!r} ({len(unknown)} in all): config.json and "
            f"weights disagree?"
        )
    filled = set()
    with torch.no_grad():
        for e in plan:
            if e.ours not in ours:
                raise CheckpointError(f"model has no tensor {e.ours!r}: check the config")
            t = e.to_ours([get_hf(n) for n in e.hf])
            target = ours[e.ours]
            if tuple(t.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"{e.ours} (from {', '.join(e.hf)}) has shape {tuple(t.shape)}, model expects "
                    f"{tuple(target.shape)}: config.json and weights disagree"
                )
            target.copy_(t.to(dtype or target.dtype))
            filled.add(e.ours)
    left = [k for k in ours if k not in filled and not k.endswith("_extra_state")]
    if left:
        raise CheckpointError(f"model tensor {left[0]!r} was not filled by the checkpoint")


def _expert_layout(state_keys) -> str:
    return "te_grouped" if any(".experts.linear_fc1.weight" in k for k in state_keys) else "sequential"


def load_hf(source: Union[str, os.PathLike, "torch.nn.Module"], dtype: torch.dtype = torch.float32,
            backend: str = "auto", **overrides):
    """Our Megatron-Core `GPTModel` with the weights of a HF Qwen3-Next.

    `source`: a directory (config.json + safetensors) or a transformers `Qwen3NextForCausalLM`.
    `overrides`: `Qwen3NextConfig` fields (e.g. `linear_attention_use_recurrent=True`).
    Sets up a one-process group when none exists, so this works in a plain Python process.
    """
    init_single_process()
    if isinstance(source, torch.nn.Module):
        hf_cfg = source.config
        state = source.state_dict()
        get, names = state.__getitem__, list(state.keys())
    else:
        path = os.fspath(source)
        hf_cfg = path
        reader = SafetensorsReader(path)
        get, names = reader.__getitem__, list(reader.keys())
    kw = dict(params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
              use_cpu_initialization=True, perform_initialization=False)
    kw.update(overrides)
    config = Qwen3NextConfig.from_hf(hf_cfg, **kw)
    model = build_model(config, backend=backend)
    if config.tie_word_embeddings:  # HF keeps lm_head.weight in its state dict even when tied
        names = [n for n in names if n != "lm_head.weight"]
    load_weights(model, get, names, config)
    if torch.cuda.is_available():
        model = model.cuda()
    return model.eval()
