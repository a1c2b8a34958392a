"""Cut global (TP=1) tensors into this rank's tensor-parallel shards.

Megatron marks every TP-split parameter with `tensor_model_parallel` and `partition_dim`;
our own split tensors are laid out per head group so a contiguous split is right. The one
exception is Megatron's SwiGLU `linear_fc1` = [gate; up]: each rank holds [gate_r; up_r].
"""

from __future__ import annotations

from typing import Dict

import torch


def shard_tensor(name: str, full: torch.Tensor, param: torch.Tensor, rank: int, size: int, glu: bool) -> torch.Tensor:
    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if glu and ("linear_fc1.weight" in name or "linear_fc1.bias" in name):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim)[rank], up.chunk(size, dim)[rank]], dim=0).contiguous()
    return full.chunk(size, dim)[rank].contiguous()


def shard_state_dict(full: Dict[str, torch.Tensor], model, tp_rank: int, tp_size: int) -> Dict[str, torch.Tensor]:
    """This rank's state dict from a global one, for `model` built at TP = `tp_size`."""
    glu = bool(model.config.gated_linear_unit)
    params = dict(model.named_parameters())
    out = {}
    for name, tensor in full.items():
        p = params.get(name)
        out[name] = tensor if p is None else shard_tensor(name, tensor, p, tp_rank, tp_size, glu)
    return out
