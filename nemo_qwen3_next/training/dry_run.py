"""`--dry-run`: build the model on the meta device (no memory), count parameters, estimate
per-GPU memory for the configured parallel layout.

The count is exact (the real Megatron modules, built with TP=PP=EP=1 so every parameter exists
once); the memory estimate is arithmetic on that count:

* weights: dense parameters of the largest pipeline stage / TP, expert parameters / (EP x expert-TP);
  2 bytes each in bf16 (4 in fp32).
* gradients: 4 bytes per local parameter (Megatron keeps fp32 main grads).
* optimizer: Adam's fp32 master, m, v = 12 bytes per local parameter, divided by the data-parallel
  size (dense) or expert-data-parallel size (experts) with the distributed optimizer.
* activations (rough): per layer and micro-batch 34·s·b·h/TP bytes (Korthikanti et al., with SP and
  flash attention) plus, for MoE layers, the routed tokens' expert activations
  (s/TP)·b·k·(2h + 3f)·2 bytes; times the layers of a stage and the PP micro-batches the first
  stage holds in flight under 1F1B. Recompute and CUDA/NCCL workspaces are not modelled.
* context parallelism (CP > 1): ``s`` above is the rank's ``seq_length / CP``, plus what the CP
  exchanges keep for backward (`cp_exchange_bytes`): each gated-attention layer's all-gathered K/V
  (the whole sequence), each GDN layer's all-gathered ``[F | P]`` states (fp32) and its tokens'
  transition read-outs ``o_P`` (``Dk`` extra value columns per head).
"""

from __future__ import annotations

import dataclasses
from typing import Dict

import torch

GiB = 1024**3


def _meta_model(mcfg):
    from ..model import init_single_process

    init_single_process()
    full = dataclasses.replace(
        mcfg,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None,
        expert_model_parallel_size=1, expert_tensor_parallel_size=1, context_parallel_size=1,
        sequence_parallel=False, use_cpu_initialization=True, perform_initialization=False,
    )
    if full.moe_grouped_gemm:
        try:
            import grouped_gemm  # noqa: F401
        except ImportError:  # same parameters, one tensor per expert instead of one per layer
            full = dataclasses.replace(full, moe_grouped_gemm=False)
    with torch.device("meta"):
        return full.configure_model(tokenizer=None), full


def count_parameters(mcfg) -> Dict[str, float]:
    """Exact parameter counts of the whole model (built on the meta device)."""
    model, full = _meta_model(mcfg)
    assert all(p.device.type == "meta" for p in model.parameters()), "dry run allocated real tensors"
    return count_named_parameters(model.named_parameters(), full)


def count_named_parameters(named_parameters, full) -> Dict[str, float]:
    """Total / expert / embedding / active-per-token counts of these parameters (a whole model, or
    one rank's shards of a training model)."""
    total = expert = embed = 0
    for name, p in named_parameters:
        n = p.numel()
        total += n
        if ".experts." in name:
            expert += n
        if "embedding" in name or "output_layer" in name:
            embed += n
    moe_layers = sum(full.is_moe_layer(i) for i in range(full.num_layers))
    active_expert = expert * full.moe_router_topk / full.num_moe_experts if moe_layers else 0
    dense = total - expert
    return {
        "total": total,
        "expert": expert,
        "dense": dense,
        "embedding_and_output": embed,
        "active": dense + active_expert,
        "active_without_embeddings": dense - embed + active_expert,
        "num_layers": full.num_layers,
    }


def cp_exchange_bytes(mcfg, seq_length: int, micro_batch: int, tp: int, cp: int) -> Dict[str, float]:
    """Bytes one rank keeps for backward from the CP exchanges (see docs/parallelism.md), per layer of
    each kind: ``attention`` (gathered K and V, ``2·T·b·groups·head_dim``) and ``gdn`` (gathered
    ``[F | P]`` ``2·CP·b·Hv·Dk·(Dk+Dv)`` fp32 + ``o_P`` ``(T/CP)·b·Hv·Dk``); heads and groups per TP rank."""
    if cp <= 1:
        return {"attention": 0.0, "gdn": 0.0}
    act = 2 if mcfg.bf16 else 4
    groups = max(1, (mcfg.num_query_groups or mcfg.num_attention_heads) // tp)
    hv, dk, dv = max(1, mcfg.linear_num_value_heads // tp), mcfg.linear_key_head_dim, mcfg.linear_value_head_dim
    b = micro_batch
    return {"attention": 2.0 * seq_length * b * groups * mcfg.kv_channels * act,
            "gdn": 2.0 * cp * b * hv * dk * (dk + dv) * 4 + seq_length / cp * b * hv * dk * act}


def memory_estimate(counts: Dict[str, float], mcfg, cfg, world_size: int) -> Dict[str, float]:
    p, d = cfg.parallelism, cfg.data
    tp, pp, cp, ep = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size,
                      p.expert_model_parallel_size)
    etp = p.expert_tensor_parallel_size or tp
    dp = max(1, world_size // (tp * pp * cp))
    edp = max(1, world_size // (etp * ep * pp))
    layers_per_stage = -(-mcfg.num_layers // pp)
    embed_half = counts["embedding_and_output"] / (1 if mcfg.tie_word_embeddings else 2)
    layer_dense = (counts["dense"] - counts["embedding_and_output"]) / mcfg.num_layers
    layer_expert = counts["expert"] / mcfg.num_layers
    dense_local = (layer_dense * layers_per_stage + embed_half) / tp
    expert_local = layer_expert * layers_per_stage / (ep * etp)
    bf16 = bool(mcfg.bf16)
    dist_opt = cfg.optim.use_distributed_optimizer
    weights = (dense_local + expert_local) * (2 if bf16 else 4)
    grads = (dense_local + expert_local) * 4
    optim = 12 * (dense_local / (dp if dist_opt else 1) + expert_local / (edp if dist_opt else 1))
    s, b, h = d.seq_length / cp, d.micro_batch_size, mcfg.hidden_size
    act_layer = 34 * s * b * h / tp
    if mcfg.num_moe_experts:
        act_layer += (s / tp) * b * mcfg.moe_router_topk * (2 * h + 3 * mcfg.moe_ffn_hidden_size) * 2
    in_flight = pp if pp > 1 else 1
    ex = cp_exchange_bytes(mcfg, d.seq_length, b, tp, cp)
    kinds = list(mcfg.layer_types)
    cp_exchange = sum(ex["attention"] if k == "full_attention" else ex["gdn"]
                      for k in kinds[:layers_per_stage]) * in_flight  # the first stage (PP cuts in order)
    activations = act_layer * layers_per_stage * in_flight + cp_exchange
    return {
        "world_size": world_size, "data_parallel": dp, "expert_data_parallel": edp,
        "layers_per_stage": layers_per_stage,
        "params_per_gpu": dense_local + expert_local,
        "weights_gib": weights / GiB, "grads_gib": grads / GiB, "optimizer_gib": optim / GiB,
        "activations_gib": activations / GiB, "cp_exchange_gib": cp_exchange / GiB,
        "total_gib": (weights + grads + optim + activations) / GiB,
    }


def report(mcfg, cfg) -> str:
    p = cfg.parallelism
    world = (p.devices or 1) * cfg.trainer.num_nodes
    counts = count_parameters(mcfg)
    mem = memory_estimate(counts, mcfg, cfg, world)
    etp = p.expert_tensor_parallel_size or p.tensor_model_parallel_size
    cp_part = f" (of which CP exchanges {mem['cp_exchange_gib']:.1f} GiB)" if p.context_parallel_size > 1 else ""
    lines = [
        f"model: {cfg.name}  layers={mcfg.num_layers} ({mcfg.layer_types.count('linear_attention')} Gated DeltaNet, "
        f"{mcfg.layer_types.count('full_attention')} gated attention)  experts={mcfg.num_moe_experts} top-{mcfg.moe_router_topk}",
        f"parameters: total {counts['total'] / 1e9:.2f}B  active/token {counts['active'] / 1e9:.2f}B "
        f"({counts['active_without_embeddings'] / 1e9:.2f}B without embeddings)  experts {counts['expert'] / 1e9:.2f}B",
        f"layout: {cfg.trainer.num_nodes} node(s) x {p.devices or 1} GPU = {world}; TP={p.tensor_model_parallel_size} "
        f"PP={p.pipeline_model_parallel_size} CP={p.context_parallel_size} DP={mem['data_parallel']} "
        f"EP={p.expert_model_parallel_size} expert-TP={etp} expert-DP={mem['expert_data_parallel']} "
        f"SP={p.sequence_parallel}  micro/global batch {cfg.data.micro_batch_size}/{cfg.data.global_batch_size} "
        f"x {cfg.data.seq_length} tokens",
        f"per-GPU memory estimate (largest stage, {mem['layers_per_stage']} layers, "
        f"{mem['params_per_gpu'] / 1e9:.2f}B params): weights {mem['weights_gib']:.1f} GiB + grads "
        f"{mem['grads_gib']:.1f} GiB + optimizer {mem['optimizer_gib']:.1f} GiB + activations ~"
        f"{mem['activations_gib']:.1f} GiB{cp_part} = {mem['total_gib']:.1f} GiB",
    ]
    return "\n".join(lines)
