"""`Qwen3NextTransformerLayer`: one layer spec for the whole decoder; each layer picks its parts.

The layer reads `config.layer_types[i]` (GDN or gated attention) and `config.is_moe_layer(i)`
(MoE or dense MLP) for its *global* index i, so the same spec serves any pipeline split
(the offset comes from Megatron's `get_transformer_layer_offset`). Everything else — residuals,
norms, bias-dropout-add, recompute — is Megatron's `TransformerLayer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)
from megatron.core.utils import get_pg_rank

from .config import FULL, LINEAR


@dataclass
class Qwen3NextLayerSubmodules:
    """The candidate parts of a layer; `Qwen3NextTransformerLayer` takes one mixer and one MLP."""

    input_layernorm: Union[ModuleSpec, type] = IdentityOp
    linear_attention: Union[ModuleSpec, type] = IdentityOp
    full_attention: Union[ModuleSpec, type] = IdentityOp
    self_attn_bda: Union[ModuleSpec, type] = IdentityFuncOp
    pre_mlp_layernorm: Union[ModuleSpec, type] = IdentityOp
    moe: Union[ModuleSpec, type] = IdentityOp
    dense_mlp: Union[ModuleSpec, type] = IdentityOp
    mlp_bda: Union[ModuleSpec, type] = IdentityFuncOp


def select_layer_submodules(config, layer_index: int, candidates: Qwen3NextLayerSubmodules) -> TransformerLayerSubmodules:
    """The one function that maps a global 0-based layer index to Megatron layer submodules."""
    kind = config.layer_type(layer_index)
    mixer = {LINEAR: candidates.linear_attention, FULL: candidates.full_attention}[kind]
    mlp = candidates.moe if config.is_moe_layer(layer_index) else candidates.dense_mlp
    return TransformerLayerSubmodules(
        input_layernorm=candidates.input_layernorm,
        self_attention=mixer,
        self_attn_bda=candidates.self_attn_bda,
        pre_mlp_layernorm=candidates.pre_mlp_layernorm,
        mlp=mlp,
        mlp_bda=candidates.mlp_bda,
    )


class Qwen3NextTransformerLayer(TransformerLayer):
    """A Megatron `TransformerLayer` whose mixer and MLP follow `layer_types` / the MoE pattern."""

    def __init__(
        self,
        config,
        submodules: Qwen3NextLayerSubmodules,
        layer_number: int = 1,
        hidden_dropout: Optional[float] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        vp_stage: Optional[int] = None,
    ):
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        offset = get_transformer_layer_offset(config, vp_stage, get_pg_rank(pg_collection.pp))
        layer_index = layer_number + offset - 1  # global, 0-based (HF numbering)
        chosen = select_layer_submodules(config, layer_index, submodules)
        super().__init__(config, chosen, layer_number, hidden_dropout, pg_collection, vp_stage)
        self.layer_index = layer_index
        self.layer_type = config.layer_type(layer_index)
