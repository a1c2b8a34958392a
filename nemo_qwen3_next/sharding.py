"""Cut global (TP=1) tensors into this rank's tensor-parallel shards.

Every split tensor of ours is laid out per head group, so a contiguous split of the one
dimension where the local shape differs from the global one is right. We read that dimension
off the shapes rather than Megatron's `partition_dim` attribute, which Megatron only sets when
it initialises weights itself. The one exception is Megatron's SwiGLU `linear_fc1` = [gate; up]:
each rank holds [gate_r; up_r].
"""

from __future__ import annotations

from typing import Dict

import torch


def shard_tensor(name: str, full: torch.Tensor, local_shape, rank: int, size: int, glu: bool) -> torch.Tensor:
    """Rank `rank`'s shard of `full` for a parameter of shape `local_shape`."""
    if tuple(full.shape) == tuple(local_shape):
        return full
    dims = [d for d, (a, b) in enumerate(zip(full.shape, local_shape)) if a != b]
    if len(dims) != 1 or full.shape[dims[0]] != local_shape[dims[0]] * size:
        raise ValueError(f"{name}: global shape {tuple(full.shape)} does not split into {tuple(local_shape)} x {size}")
    dim = dims[0]
    if glu and ("linear_fc1.weight" in name or "linear_fc1.bias" in name):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim)[rank], up.chunk(size, dim)[rank]], dim=0).contiguous()
    return full.chunk(size, dim)[rank].contiguous()


def shard_state_dict(full: Dict[str, torch.Tensor], model, tp_rank: int, tp_size: int) -> Dict[str, torch.Tensor]:
    """This rank's state dict from a global one, for `model` built at TP = `tp_size`."""
    glu = bool(model.config.gated_linear_unit)
    local = model.state_dict()
    return {
        name: shard_tensor(name, t, local[name].shape, tp_rank, tp_size, glu) if name in local else t
        for name, t in full.items()
    }
