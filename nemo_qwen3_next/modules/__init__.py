"""Qwen3-Next Megatron-Core modules: one layer kind per file."""

from .core_attention import SDPAttention
from .gated_attention import GatedSelfAttention
from .gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules
from .norms import GatedRMSNorm, RMSNorm

__all__ = ["GatedDeltaNet", "GatedDeltaNetSubmodules", "GatedRMSNorm", "GatedSelfAttention", "RMSNorm", "SDPAttention"]
