"""torchrun worker: load the tiny HF model's weights at TP=N (optionally +SP), write logits and loss.

Every rank builds the same random HF model (same seed), maps it to our global layout and keeps
its own shard: the same global weights as the TP=1 run in the test process.
Several runs share one launch (one process start-up for all); each RUN is ``tp2`` (no SP), ``tp2_sp``,
``tp2_sp_grouped_experts`` (the grouped-GEMM experts; the others run the expert loop) or
``tp2_sp_labels``: the model computes the per-token loss itself (the fused LM head + cross-entropy,
vocab-parallel; the experts as the environment says) and the output layer's gradient shard is saved
too. Writes OUT_DIR/RUN.pt.
Usage: torchrun --nproc-per-node 2 tests/tp_worker.py OUT_DIR RUN [RUN ...]
"""

import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch
import torch.nn.functional as F


# Replicated parameters whose gradient is a sum over TP ranks (each rank sees other heads or tokens).
REPLICATED = [
    "decoder.layers.0.mlp.router.weight",
    "decoder.layers.0.input_layernorm.weight",
    "decoder.layers.0.self_attention.out_norm.weight",
    "decoder.layers.1.self_attention.q_layernorm.weight",
    "decoder.layers.3.mlp.shared_experts.gate_weight",
]


def reduce_replicated_grads(model, config):
    """What Megatron's finalize_model_grads does for TP-replicated params (no DDP wrapper here):
    sum grads of sequence-parallel params and of q/k layernorms across the TP group."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    for name, p in model.named_parameters():
        sp = config.sequence_parallel and getattr(p, "sequence_parallel", False)
        if p.grad is not None and (sp or "q_layernorm" in name or "k_layernorm" in name):
            torch.distributed.all_reduce(p.grad, group=group)


def tiny_tp_model(sp: bool, cp: int = 1, **overrides):
    """This rank's shard of the tiny HF model (seed 1) at TP = WORLD_SIZE / cp: (model, config, rank)."""
    from megatron.core import parallel_state

    from nemo_qwen3_next import Qwen3NextConfig, build_model, init_distributed
    from nemo_qwen3_next.hf_mapping import hf_to_ours
    from nemo_qwen3_next.sharding import shard_state_dict
    from nemo_qwen3_next.testing import random_hf_model, tiny_hf_config

    tp = int(os.environ["WORLD_SIZE"]) // cp
    init_distributed(tp=tp, cp=cp)
    hf = random_hf_model(tiny_hf_config(), seed=1)
    kw = dict(linear_attention_chunk_size=16, use_cpu_initialization=True, perform_initialization=False,
              params_dtype=torch.float32)
    kw.update(overrides)
    config = Qwen3NextConfig.from_hf(
        hf.config, tensor_model_parallel_size=tp, sequence_parallel=sp, context_parallel_size=cp, **kw
    )
    model = build_model(config, backend="local", parallel_output=False).eval()
    full = hf_to_ours(hf.state_dict(), config)
    rank = parallel_state.get_tensor_model_parallel_rank()
    missing, unexpected = model.load_state_dict(shard_state_dict(full, model, rank, tp), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    return model, config, rank


EXPERTS = {"tp2": "sequential", "tp2_sp": "sequential", "tp2_sp_grouped_experts": "grouped_mm"}


def main(out_path: str, sp: bool, labels: bool = False):
    model, config, rank = tiny_tp_model(sp)
    torch.manual_seed(3)
    ids = torch.randint(0, config.vocab_size, (2, 38))  # divisible by TP for SP
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    if labels:
        token_loss = model(ids, pos, None, labels=torch.roll(ids, -1, 1))
        loss, logits = token_loss.mean(), token_loss.detach()
    else:
        logits = model(ids, pos, None)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    reduce_replicated_grads(model, config)
    names = REPLICATED + (["output_layer.weight"] if labels else [])
    grads = {n: p.grad for n, p in model.named_parameters() if n in names}
    if rank == 0:
        torch.save({"logits": logits.detach(), "loss": loss.detach(), "grads": grads}, out_path)
    torch.distributed.barrier()


if __name__ == "__main__":
    launcher_experts = os.environ.get("QWEN3_NEXT_MOE_EXPERTS")
    for name in sys.argv[2:]:
        experts = EXPERTS.get(name, launcher_experts)
        if experts is None:
            os.environ.pop("QWEN3_NEXT_MOE_EXPERTS", None)
        else:
            os.environ["QWEN3_NEXT_MOE_EXPERTS"] = experts
        main(os.path.join(sys.argv[1], f"{name}.pt"), "_sp" in name, name.endswith("_labels"))
