"""`Qwen3NextMoELayer`: Megatron's `MoELayer` with a sort-free, sync-free token permutation on one rank.

Megatron's all-gather dispatcher permutes tokens with ``masked_select`` over the ``[E, N]`` routing
map and copies ``tokens_per_expert`` to the host: three device->host syncs per MoE layer, which
stall the launch queue, and it un-permutes with a bf16 ``scatter_add_`` (atomics, rounding each of
the top-k partial sums). Where no tokens leave the rank (TP x EP = 1; the all-gather is then a
no-op) and every token has exactly top-k experts (no capacity dropping), the permutation has a
static size ``N·k`` and comes from the top-k indices alone:

* ``order = argsort(expert id of each (token, slot), stable)`` — expert-major, tokens ascending
  within an expert: the same order as Megatron's, so the experts see the same rows;
* dispatch gathers rows ``order // k``; its backward sums each token's k gradient rows in fp32;
* combine gathers the expert outputs (already weighted by the experts, as Megatron does) back to
  (token, slot) order and sums the k rows per token in fp32 (one rounding, no atomics, deterministic);
  its backward is a gather.

``tokens_per_expert`` stays on the device (the grouped experts read it there). Everything else —
router, aux losses, shared expert, experts — is Megatron's. Switch: ``config.moe_fast_permute``.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher

from ..ops.usage import record
from .grouped_experts import GroupedSequentialMLP


def _gather_sum_k(t: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
    """rows ``t[idx]`` ([N·k, H], token-major) summed per token over its k rows in fp32 -> [N, H]."""
    return t.index_select(0, idx).view(idx.numel() // k, k, -1).sum(1, dtype=torch.float32).to(t.dtype)


class _Dispatch(torch.autograd.Function):
    """rows ``x[token_of]`` ([N·k, H], expert-major); backward: sum of each token's k rows."""

    @staticmethod
    def forward(ctx, x, token_of, inv, k):
        ctx.save_for_backward(inv)
        ctx.k = k
        return x.index_select(0, token_of)

    @staticmethod
    def backward(ctx, g):
        (inv,) = ctx.saved_tensors
        return _gather_sum_k(g, inv, ctx.k), None, None, None


class _Combine(torch.autograd.Function):
    """per token, the fp32 sum of its k (already weighted) expert rows ([N·k, H] expert-major -> [N, H]);
    backward: a gather. (A batched GEMM that also applied the weights here ran as 8K 1xk GEMMs: 7 ms
    per step on H200, `benchmarks/results/h200_model/profile_bmm_combine_B2T4096.txt`.)"""

    @staticmethod
    def forward(ctx, y, inv, token_of, k):
        ctx.save_for_backward(token_of)
        return _gather_sum_k(y, inv, k)

    @staticmethod
    def backward(ctx, g):
        (token_of,) = ctx.saved_tensors
        return g.index_select(0, token_of), None, None, None


class TopKPermuteDispatcher(MoEAllGatherTokenDispatcher):
    """The all-gather dispatcher on one rank (TP x EP = 1) with the permutation from the top-k indices."""

    def dispatch_postprocess(self, hidden_states, probs):
        self.hidden_shape_before_permute = hidden_states.shape
        routing_map, k = self.routing_map, self.router_topk
        # each token's k experts, ascending (a stable sort keeps equal keys in order; exactly k per
        # token: no capacity dropping on this path)
        experts = routing_map.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :k]
        order = torch.argsort(experts.reshape(-1), stable=True)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel(), device=order.device)
        self._token_of, self._inv = order // k, inv
        tokens_per_expert = routing_map.sum(dim=0)
        permuted_probs = probs.gather(1, experts).reshape(-1).index_select(0, order)
        self.routing_map = None
        record("moe_permute", "topk")
        return _Dispatch.apply(hidden_states, self._token_of, inv, k), tokens_per_expert, permuted_probs

    def combine_preprocess(self, hidden_states):
        out = _Combine.apply(hidden_states, self._inv, self._token_of, self.router_topk)
        self._token_of = self._inv = None
        return out


def fast_permute_unsupported(layer: MoELayer) -> str:
    """Why the top-k permutation cannot stand in for Megatron's here ('' when it can)."""
    cfg, d = layer.config, layer.token_dispatcher
    if not getattr(cfg, "moe_fast_permute", False):
        return "switched off (moe_fast_permute=False)"
    if type(d) is not MoEAllGatherTokenDispatcher:
        return f"dispatcher {type(d).__name__}"
    if d.tp_size * d.ep_size != 1:
        return "tokens cross ranks (TP x EP > 1)"
    if cfg.moe_expert_capacity_factor is not None or cfg.moe_pad_expert_input_to_capacity:
        return "expert capacity (dropped or padded tokens)"
    if not isinstance(layer.experts, GroupedSequentialMLP):
        return f"experts {type(layer.experts).__name__} (needs the local backend's experts)"
    return ""


class Qwen3NextMoELayer(MoELayer):
    """`MoELayer` that swaps in `TopKPermuteDispatcher` where it gives the same result (module doc)."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        if pg_collection is None:  # as the parent does, but kept: the new dispatcher needs the groups
            pg_collection = get_default_pg_collection()
        super().__init__(config, submodules, layer_number=layer_number, pg_collection=pg_collection)
        self.fast_permute_off = fast_permute_unsupported(self)
        if not self.fast_permute_off:
            old = self.token_dispatcher
            self.token_dispatcher = TopKPermuteDispatcher(
                old.num_local_experts, old.local_expert_indices, config=config, pg_collection=pg_collection
            )
