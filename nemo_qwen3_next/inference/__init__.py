"""Generation for Qwen3-Next `GPTModel`s: state (`state`), stateful forward (`forward`), sampling,
CUDA-graph decode (`cuda_graph`), and `generate` / `stream` (`generate`)."""

from .generate import Decoder, generate, stream
from .sampling import filter_logits, next_tokens
from .state import InferenceState

__all__ = ["Decoder", "InferenceState", "filter_logits", "generate", "next_tokens", "stream"]
