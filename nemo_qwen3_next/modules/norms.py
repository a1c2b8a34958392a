"""Qwen3-Next's two RMSNorms, in plain torch so they run on CPU and under sequence parallelism.

* `RMSNorm`: decoder, final and QK norms. Qwen3-Next stores the gain *zero-centred*:
  y = x̂ · (1 + w), w initialised to 0 (HF `Qwen3NextRMSNorm`). Computed in fp32, cast back
  (`ops.rms_norm`: fla's fused kernel on CUDA, the torch reference elsewhere).
  Megatron's local `WrappedTorchNorm` refuses both zero-centred gamma and sequence parallelism,
  hence this class.
* `GatedRMSNorm`: the GDN output norm, y = (w · x̂) · silu(z), with a *plain* gain (init 1) shared
  by all value heads (HF `Qwen3NextRMSNormGated`). Math in `ops.gated_rms_norm` (fused fla kernel
  on CUDA, the torch reference elsewhere).
"""

from __future__ import annotations

import torch
from torch import nn

from megatron.core.transformer.transformer_config import TransformerConfig

from ..ops.gated_rms_norm import gated_rms_norm, gated_rms_norm_ref  # noqa: F401  (re-exported)
from ..ops.rms_norm import rms_norm


class RMSNorm(nn.Module):
    """RMSNorm with Megatron's norm signature; zero-centred gain when the config says so."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.config = config
        self.eps = eps
        self.zero_centered_gamma = bool(getattr(config, "layernorm_zero_centered_gamma", True))
        init = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = nn.Parameter(init(hidden_size, dtype=config.params_dtype))
        # With sequence parallelism each TP rank sees a different slice of tokens: Megatron
        # all-reduces the gradient of parameters marked this way (finalize_model_grads).
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float()  # the gain in fp32, as HF computes (1 + w)
        return rms_norm(x, 1.0 + w if self.zero_centered_gamma else w, self.eps)


class GatedRMSNorm(nn.Module):
    """Per-head RMSNorm of the GDN output, gated by silu(z). Gain is plain (init 1).

    Under tensor parallelism each rank normalises its own value heads with the same replicated
    gain, so the gain's gradient is a sum over ranks: the caller passes `tp_group` and we
    all-reduce it in backward (identity forward), independent of sequence parallelism.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, params_dtype=torch.float32, tp_group=None,
                 backend: str = "auto"):
        super().__init__()
        self.eps = eps
        self.backend = backend  # "auto": fla's fused kernel on CUDA, the torch reference elsewhere
        self.tp_group = tp_group
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype))

    def forward(self, x: torch.Tensor, gate: torch.Tensor, gate_grad_sink=None) -> torch.Tensor:
        """``gate_grad_sink``: see `ops.gated_rms_norm` (the GDN's one-GEMM in_proj)."""
        w = self.weight
        if self.tp_group is not None and self.tp_group.size() > 1:
            from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

            w = copy_to_tensor_model_parallel_region(w, group=self.tp_group)
        return gated_rms_norm(x, gate, w, self.eps, backend=self.backend, gate_grad_sink=gate_grad_sink)
