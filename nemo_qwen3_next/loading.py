"""`load_hf`: a Hugging Face Qwen3-Next (directory or in-memory model) as our Megatron `GPTModel`.

For quick checks in one plain Python process (CPU or one GPU); multi-GPU training goes through
the NeMo checkpoint conversion instead. Weights stream from safetensors one tensor at a time.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, List, Optional, Tuple, Union

import torch

from .checkpoint import CheckpointError, SafetensorsCheckpoint, check_values
from .config import Qwen3NextConfig
from .hf_mapping import skipped_hf_names, weight_plan
from .model import build_model, init_single_process

__all__ = ["CheckpointError", "check_hf_names", "load_hf", "load_weights"]


def check_hf_names(hf_names: Iterable[str], config, plan) -> Tuple[List[str], List[str]]:
    """Every HF tensor the plan needs is there and every other one is known; returns (skipped =
    a tied `lm_head.weight`, carried = `mtp.*` tensors of a config without MTP layers)."""
    names = set(hf_names)
    needed = [n for e in plan for n in e.hf]
    missing = [n for n in needed if n not in names]
    if missing and missing[0].startswith("mtp."):
        raise CheckpointError(f"HF tensor {missing[0]!r} is missing ({len(missing)} mtp.* in all): config.json sets "
                              f"num_nextn_predict_layers = {config.mtp_num_layers} but the weights hold no full MTP "
                              f"layer; set num_nextn_predict_layers to 0 to use the checkpoint without it")
    if missing:
        raise CheckpointError(f"HF tensor {missing[0]!r} is missing ({len(missing)} missing in all); config.json "
                              f"and the weights disagree, or the checkpoint is incomplete")
    carried = skipped_hf_names(names, config)
    skipped = ["lm_head.weight"] if config.tie_word_embeddings and "lm_head.weight" in names else []
    unknown = sorted(names - set(needed) - set(skipped) - set(carried))
    if unknown:
        raise CheckpointError(f"HF checkpoint has unexpected tensor {unknown[0]!r} ({len(unknown)} in all); "
                              f"config.json and the weights disagree (e.g. num_hidden_layers, num_experts, "
                              f"layer_types)")
    return skipped, carried


def load_weights(model, get_hf: Callable[[str], torch.Tensor], hf_names: Iterable[str], config,
                 dtype: Optional[torch.dtype] = None) -> None:
    """Fill every parameter of `model` (TP=1) from HF tensors, checking names and shapes."""
    ours = model.state_dict()
    plan = weight_plan(config, expert_layout=_expert_layout(ours))
    check_hf_names(hf_names, config, plan)
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
            backend: str = "auto", allow_non_finite: bool = False, **overrides):
    """Our Megatron-Core `GPTModel` with the weights of a HF Qwen3-Next.

    `source`: a directory (config.json + safetensors) or a transformers `Qwen3NextForCausalLM`.
    `allow_non_finite`: accept NaN/inf weights (refused by default, naming the tensor and index).
    `overrides`: `Qwen3NextConfig` fields (e.g. `linear_attention_use_recurrent=True`).
    Sets up a one-process group when none exists, so this works in a plain Python process.
    Files are validated from their headers (`checkpoint.SafetensorsCheckpoint`) before anything is built.
    """
    if isinstance(source, torch.nn.Module):
        hf_cfg = source.config
        state = source.state_dict()

        def get(name):
            check_values(name, state[name], "the in-memory model", allow_non_finite)
            return state[name]

        names = list(state.keys())
    else:
        path = os.fspath(source)
        hf_cfg = os.path.join(path, "config.json")
        if not os.path.isfile(hf_cfg):
            raise CheckpointError(f"{path}: no config.json; give a Hugging Face model directory")
        reader = SafetensorsCheckpoint(path, allow_non_finite=allow_non_finite)
        get, names = reader.__getitem__, list(reader.keys())
    kw = dict(params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
              use_cpu_initialization=True, perform_initialization=False)
    kw.update(overrides)
    config = Qwen3NextConfig.from_hf(hf_cfg, **kw)
    init_single_process()
    model = build_model(config, backend=backend)
    if config.tie_word_embeddings:  # HF keeps lm_head.weight in its state dict even when tied
        names = [n for n in names if n != "lm_head.weight"]
    load_weights(model, get, names, config)
    if torch.cuda.is_available():
        model = model.cuda()
    return model.eval()
