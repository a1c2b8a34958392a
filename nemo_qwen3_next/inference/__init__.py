"""Generation for Qwen3-Next `GPTModel`s: state (`state`), stateful forward (`forward`), sampling,
CUDA-graph decode (`cuda_graph`), speculative decoding (`speculative`), and `generate` / `stream` (`generate`).

Names are imported on first use (PEP 562), so `inference.checks` (stdlib only) stays cheap for the CLI."""

import importlib

_EXPORTS = {
    "Decoder": "generate", "generate": "generate", "stream": "generate",
    "filter_logits": "sampling", "next_tokens": "sampling",
    "Drafter": "speculative", "MTPDrafter": "speculative", "SpeculativeStats": "speculative",
    "InferenceState": "state",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
