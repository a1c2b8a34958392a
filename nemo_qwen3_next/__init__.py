"""Qwen3-Next (Gated DeltaNet + gated attention + MoE) for Megatron-Core and NeMo 2.

Core API (megatron-core and torch only; NeMo glue lives in `nemo_qwen3_next.nemo`):

* `Qwen3NextConfig` and presets (`qwen3_next_80b_a3b`, `qwen3_next_tiny_5m` ...)
* `get_qwen3_next_block_spec(config, backend)`, registered as ``megatron_qwen3_next``
* `build_model(config)` -> Megatron `GPTModel`
* `load_hf(path_or_model)` -> `GPTModel` with Hugging Face weights
"""

from .config import (
    PRESETS,
    ConfigError,
    Qwen3NextConfig,
    qwen3_next_80b_a3b,
    qwen3_next_tiny_5m,
    qwen3_next_tiny_10m,
    qwen3_next_tiny_50m,
)
from .loading import CheckpointError, load_hf
from .model import build_model, init_distributed, init_single_process
from .spec import SPEC_NAME, get_qwen3_next_block_spec, get_qwen3_next_layer_spec, register_spec, resolve_spec

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "SPEC_NAME",
    "CheckpointError",
    "ConfigError",
    "Qwen3NextConfig",
    "build_model",
    "get_qwen3_next_block_spec",
    "get_qwen3_next_layer_spec",
    "init_distributed",
    "init_single_process",
    "load_hf",
    "qwen3_next_80b_a3b",
    "qwen3_next_tiny_10m",
    "qwen3_next_tiny_50m",
    "qwen3_next_tiny_5m",
    "register_spec",
    "resolve_spec",
]
