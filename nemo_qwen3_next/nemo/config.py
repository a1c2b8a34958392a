"""`Qwen3NextNeMoConfig`: NeMo's `GPTConfig` carrying every Qwen3-Next field.

The fields and their validation are the core's `Qwen3NextConfig` (multiple inheritance, nothing
re-listed); `GPTConfig` adds NeMo's training plumbing (forward/data step, seq_length, IOMixin so
the config is serialised into a checkpoint's `context/`). `configure_model` builds the Megatron
`GPTModel` exactly like the core's `build_model`: our block spec, partial RoPE, (un)tied
embeddings. `transformer_layer_spec` may be a callable or a registered name, so a YAML config
can say ``transformer_layer_spec: megatron_qwen3_next``.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from nemo.collections.llm.gpt.model.base import GPTConfig

from ..config import Qwen3NextConfig, qwen3_next_80b_a3b, qwen3_next_tiny_5m
from ..spec import SPEC_NAME, resolve_spec


@dataclass
class Qwen3NextNeMoConfig(Qwen3NextConfig, GPTConfig):
    """Qwen3-Next for NeMo 2. Defaults are Qwen3-Next-80B-A3B's (see the core `Qwen3NextConfig`).

    `tie_word_embeddings` is the one switch for tied embeddings; NeMo's
    `share_embeddings_and_output_weights` is derived from it.
    """

    transformer_layer_spec: Union[str, Callable] = SPEC_NAME
    spec_backend: str = "auto"  # 'auto' | 'te' | 'local', passed to the spec builder
    position_embedding_type: str = "rope"
    share_embeddings_and_output_weights: bool = False
    make_vocab_size_divisible_by: int = 128
    seq_length: int = 4096
    masked_softmax_fusion: bool = False
    cross_entropy_loss_fusion: bool = False
    gradient_accumulation_fusion: bool = False

    def __post_init__(self):
        self.share_embeddings_and_output_weights = bool(self.tie_word_embeddings)
        super().__post_init__()

    def block_spec(self, vp_stage: Optional[int] = None):
        """The decoder block spec: `transformer_layer_spec` resolved (name -> registry) and called."""
        spec = self.transformer_layer_spec
        if isinstance(spec, str):
            spec = resolve_spec(spec)
        if not callable(spec):
            return spec  # an already-built spec object
        params = inspect.signature(spec).parameters
        kw = {}
        if "vp_stage" in params:
            kw["vp_stage"] = vp_stage
        if "backend" in params:
            kw["backend"] = self.spec_backend
        return spec(self, **kw)

    def configure_model(self, tokenizer=None, pre_process=None, post_process=None, vp_stage=None):
        """Megatron `GPTModel` for this config (this pipeline stage), on the meta device when
        `init_model_with_meta_device`."""
        from megatron.core import parallel_state

        from ..model import build_model

        vp_stage = vp_stage or 0
        if self.vocab_size is None:
            raise ValueError("Qwen3NextNeMoConfig.vocab_size is None; set it (Qwen3-Next: 151936).")
        if pre_process is None:
            pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        if post_process is None:
            post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        device = torch.device("meta") if self.init_model_with_meta_device else nullcontext()
        with device:
            return build_model(
                self,
                transformer_layer_spec=self.block_spec(vp_stage),
                pre_process=pre_process,
                post_process=post_process,
                vp_stage=vp_stage,
                parallel_output=self.parallel_output,
                max_sequence_length=self.seq_length,
                fp16_lm_cross_entropy=self.fp16_lm_cross_entropy,
                scatter_embedding_sequence_parallel=self.scatter_embedding_sequence_parallel,
            )


def _as_nemo(core_config: Qwen3NextConfig, **overrides) -> Qwen3NextNeMoConfig:
    import dataclasses

    kw = {f.name: getattr(core_config, f.name) for f in dataclasses.fields(Qwen3NextConfig) if f.init}
    kw.update(overrides)
    return Qwen3NextNeMoConfig(**kw)


def from_core(core_config: Qwen3NextConfig, **overrides) -> Qwen3NextNeMoConfig:
    """The NeMo config with every field of a core `Qwen3NextConfig` (e.g. from `Qwen3NextConfig.from_hf`)."""
    return _as_nemo(core_config, **overrides)


def qwen3_next_80b_a3b_nemo(**overrides) -> Qwen3NextNeMoConfig:
    """Qwen3-Next-80B-A3B (bf16), as a NeMo config."""
    return _as_nemo(qwen3_next_80b_a3b(), **overrides)


def qwen3_next_tiny_nemo(**overrides) -> Qwen3NextNeMoConfig:
    """~5M-parameter Qwen3-Next (the core's `qwen3_next_tiny_5m`), as a NeMo config."""
    return _as_nemo(qwen3_next_tiny_5m(), **overrides)
