"""Generation for Qwen3-Next `GPTModel`s: state (`state`), stateful forward (`forward`), sampling,
CUDA-graph decode (`cuda_graph`), speculative decoding (`speculative`), and `generate` / `stream` (`generate`)."""

from .generate import Decoder, generate, stream
from .sampling import filter_logits, next_tokens
from .speculative import Drafter, MTPDrafter, SpeculativeStats
from .state import InferenceState

__all__ = ["Decoder", "Drafter", "InferenceState", "MTPDrafter", "SpeculativeStats", "filter_logits", "generate",
           "next_tokens", "stream"]
