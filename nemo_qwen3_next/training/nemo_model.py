"""The NeMo model the trainer uses.

Prefers the project's NeMo glue (`nemo_qwen3_next.nemo`) when it is present; until then this
module carries the minimal `llm.GPTConfig` subclass pretraining needs: `Qwen3NextConfig`'s fields
and validation, NeMo's `GPTConfig.configure_model`, and `transformer_layer_spec` given by
registry name (``megatron_qwen3_next``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

from nemo.collections import llm

from ..config import Qwen3NextConfig
from ..spec import SPEC_NAME, resolve_spec


@dataclass
class Qwen3NextGPTConfig(Qwen3NextConfig, llm.GPTConfig):
    """`Qwen3NextConfig` as a NeMo `GPTConfig` (fields from both; Qwen3-Next defaults win)."""

    transformer_layer_spec: Union[str, Callable] = SPEC_NAME
    position_embedding_type: str = "rope"
    share_embeddings_and_output_weights: bool = False
    make_vocab_size_divisible_by: int = 128
    seq_length: int = 4096
    masked_softmax_fusion: bool = False
    cross_entropy_loss_fusion: bool = False
    gradient_accumulation_fusion: bool = False
    # NeMo reads these when printing / estimating; keep the defaults honest for this model.
    use_transformer_engine_full_layer_spec: bool = False

    def __post_init__(self):
        self.share_embeddings_and_output_weights = bool(self.tie_word_embeddings)
        super().__post_init__()

    def configure_model(self, tokenizer, pre_process=None, post_process=None, vp_stage=None):
        spec = self.transformer_layer_spec
        if isinstance(spec, str):
            self.transformer_layer_spec = resolve_spec(spec)
        try:
            return super().configure_model(tokenizer, pre_process, post_process, vp_stage)
        finally:
            self.transformer_layer_spec = spec


def model_classes():
    """(config class, model class) for Qwen3-Next in NeMo."""
    return Qwen3NextGPTConfig, llm.GPTModel
