"""Sequence-mixing kernels for the Qwen3-Next gated DeltaNet (GDN) layer.

``gated_delta_rule`` and ``causal_conv1d`` are the dispatch seams (fla / causal-conv1d on GPU,
plain torch elsewhere); the ``*_ref`` functions are the plain-torch references they fall back to.
"""

from .causal_conv1d import causal_conv1d, causal_conv1d_ref, causal_conv1d_update
from .gated_delta_rule import gated_delta_rule
from .gated_delta_rule_ref import chunk_gated_delta_rule_ref, l2norm, recurrent_gated_delta_rule_ref

__all__ = [
    "gated_delta_rule",
    "causal_conv1d",
    "causal_conv1d_update",
    "chunk_gated_delta_rule_ref",
    "recurrent_gated_delta_rule_ref",
    "causal_conv1d_ref",
    "l2norm",
]
