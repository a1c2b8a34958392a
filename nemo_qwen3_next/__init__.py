"""Qwen3-Next (Gated DeltaNet + gated attention + MoE) for Megatron-Core and NeMo 2.

Core API (megatron-core and torch only; NeMo glue lives in `nemo_qwen3_next.nemo`):

* `Qwen3NextConfig` and presets (`qwen3_next_80b_a3b`, `qwen3_next_tiny_5m` ...)
* `get_qwen3_next_block_spec(config, backend)`, registered as ``megatron_qwen3_next``
* `build_model(config)` -> Megatron `GPTModel`
* `load_hf(path_or_model)` -> `GPTModel` with Hugging Face weights
* `generate(model, input_ids, max_new_tokens, ...)` / `stream(...)`: generation (`nemo_qwen3_next.inference`)
"""

import importlib

# Names are imported on first use (PEP 562), so `import nemo_qwen3_next.checkpoint` in a CLI stays
# cheap: the CLIs check their arguments and inputs before megatron-core (~6 s) is imported.
_EXPORTS = {
    "PRESETS": "config", "ConfigError": "config", "Qwen3NextConfig": "config",
    "qwen3_next_80b_a3b": "config", "qwen3_next_tiny_5m": "config",
    "qwen3_next_tiny_10m": "config", "qwen3_next_tiny_50m": "config",
    "CheckpointError": "checkpoint", "load_hf": "loading",
    "build_model": "model", "init_distributed": "model", "init_single_process": "model",
    "SPEC_NAME": "spec", "get_qwen3_next_block_spec": "spec", "get_qwen3_next_layer_spec": "spec",
    "register_spec": "spec", "resolve_spec": "spec",
    "generate": "inference", "stream": "inference",
}


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "SPEC_NAME",
    "CheckpointError",
    "ConfigError",
    "Qwen3NextConfig",
    "build_model",
    "generate",
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
    "stream",
]
