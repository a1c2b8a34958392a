"""Module specs for the Qwen3-Next decoder, and the registry that names them.

`get_qwen3_next_block_spec(config, backend)` returns Megatron `TransformerBlockSubmodules`
for `megatron.core.models.gpt.GPTModel(transformer_layer_spec=...)`. A backend only decides
which classes fill the slots:

* ``local``: Megatron's `ColumnParallelLinear` / `RowParallelLinear`, our `RMSNorm` and SDPA core
  attention, `SequentialMLP` experts as `GroupedSequentialMLP` (same parameters; grouped GEMMs on sm90+ bf16,
  ``QWEN3_NEXT_MOE_EXPERTS``), or the legacy `GroupedMLP` with `moe_grouped_gemm`.
  Runs on CPU and GPU.
* ``te``: TransformerEngine linears, `TENorm` (zero-centred gamma from the config),
  `TEDotProductAttention`, `TEGroupedMLP` experts.
* ``auto``: ``te`` when TransformerEngine imports and CUDA is present, else ``local``.

The registry maps a name (``megatron_qwen3_next``) to a spec builder so YAML configs can say
``transformer_layer_spec: megatron_qwen3_next``.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from .layer import Qwen3NextLayerSubmodules, Qwen3NextTransformerLayer
from .modules import GatedDeltaNet, GatedDeltaNetSubmodules, GatedSelfAttention, RMSNorm, SDPAttention
from .modules.grouped_experts import GroupedSequentialMLP
from .modules.moe import Qwen3NextMoELayer

SPEC_NAME = "megatron_qwen3_next"


def have_te() -> bool:
    """TransformerEngine importable (its Megatron extension included)."""
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE  # noqa: F401

        return bool(HAVE_TE)
    except Exception:
        return False


def _resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "te" if (torch.cuda.is_available() and have_te()) else "local"
    if backend not in ("te", "local"):
        raise ValueError(f"backend = {backend!r}; use 'auto', 'te' or 'local'.")
    if backend == "te" and not have_te():
        raise ImportError(
            "backend='te' needs TransformerEngine: pip install 'transformer-engine[pytorch]' "
            "(or use backend='local')."
        )
    return backend


def get_qwen3_next_layer_spec(config, backend: str = "auto") -> ModuleSpec:
    """Spec of one `Qwen3NextTransformerLayer` holding every candidate part."""
    backend = _resolve_backend(backend)
    if backend == "te":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        provider = TESpecProvider()
        norm = provider.layer_norm(rms_norm=True)
        core_attention = provider.core_attention()
    else:
        provider = LocalSpecProvider()
        norm = RMSNorm
        core_attention = SDPAttention
    col, row = provider.column_parallel_linear(), provider.row_parallel_linear()

    linear_attention = ModuleSpec(
        module=GatedDeltaNet, submodules=GatedDeltaNetSubmodules(in_proj=col, out_proj=row)
    )
    full_attention = ModuleSpec(
        module=GatedSelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=col, core_attention=core_attention, linear_proj=row, q_layernorm=norm, k_layernorm=norm
        ),
    )
    dense_mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=col, linear_fc2=row))

    moe = None
    if config.num_moe_experts:
        expert_module, expert_submodules = provider.grouped_mlp_modules(bool(config.moe_grouped_gemm), False)
        if backend == "local" and expert_module is SequentialMLP:  # same parameters, optional grouped GEMMs
            expert_module = GroupedSequentialMLP
        shared = None
        if config.moe_shared_expert_intermediate_size:
            shared = ModuleSpec(
                module=SharedExpertMLP,
                params={"gate": bool(config.moe_shared_expert_gate)},
                submodules=MLPSubmodules(linear_fc1=col, linear_fc2=row),
            )
        moe = ModuleSpec(
            module=Qwen3NextMoELayer,
            submodules=MoESubmodules(
                experts=ModuleSpec(module=expert_module, submodules=expert_submodules), shared_experts=shared
            ),
        )

    return ModuleSpec(
        module=Qwen3NextTransformerLayer,
        submodules=Qwen3NextLayerSubmodules(
            input_layernorm=norm,
            linear_attention=linear_attention,
            full_attention=full_attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            moe=moe or dense_mlp,
            dense_mlp=dense_mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_qwen3_next_block_spec(
    config, backend: str = "auto", vp_stage: Optional[int] = None, pp_rank: Optional[int] = None
) -> TransformerBlockSubmodules:
    """Decoder block spec: this pipeline stage's layers plus the final (zero-centred) RMSNorm."""
    layer = get_qwen3_next_layer_spec(config, backend)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    final_norm = layer.submodules.input_layernorm
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=final_norm)


# ---------------------------------------------------------------------- registry
_SPECS: Dict[str, Callable] = {SPEC_NAME: get_qwen3_next_block_spec}


def register_spec(name: str, builder: Callable) -> None:
    """Make `builder(config, **kw)` available under `name` (e.g. for YAML configs)."""
    _SPECS[name] = builder


def resolve_spec(name: str) -> Callable:
    """The spec builder registered under `name`; one clear error when unknown."""
    try:
        return _SPECS[name]
    except KeyError:
        raise KeyError(
            f"transformer_layer_spec = {name!r} is not registered; known: {sorted(_SPECS)}"
        ) from None
