"""torchrun worker: the tiny HF model at context parallelism CP (x TP), in training mode.

The batch is cut with Megatron's CP split; each rank computes the per-token loss of its own tokens,
divided by the global token count, and backpropagates; gradients are then summed over CP (and over
TP for TP-replicated parameters), as Megatron's finalize_model_grads does. Every rank writes
OUT_DIR/rank{r}.pt: full-sequence logits (gathered back to global order), the global loss and its
gradients (its TP shards). Several layouts run in one launch (one process start-up for all):
each RUN is ``cpC``, ``tpT_sp_cpC`` (T x C = N), ``cpC_thd`` (packed documents, Megatron's THD
CP layout), ``cpC_recompute`` (GDN recompute: the exchanges run again in backward) or ``cpC_schedule``
(Megatron's schedule + DDP, NeMo's loss: `schedule_grads`), and writes OUT_DIR/RUN_rank{r}.pt.
Usage: torchrun --nproc-per-node N tests/cp_worker.py OUT_DIR RUN [RUN ...]
"""

import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tp_worker import reduce_replicated_grads, tiny_tp_model

CHUNK = 8  # GDN chunk size: the per-rank chunks (88 / 2CP tokens) are not multiples of it
BATCH, SEQ = 2, 88


def batch():
    """The global batch: ids, next-token labels and a loss mask without the last position."""
    torch.manual_seed(3)
    ids = torch.randint(0, 256, (BATCH, SEQ))
    mask = torch.ones(BATCH, SEQ)
    mask[:, -1] = 0
    return ids, torch.roll(ids, -1, 1), mask


DOCS = [24, 8, 40, 16]  # packed run: row 0 of the batch as four documents (multiples of 2CP for CP <= 4)


def packed(ids, labels, mask):
    """Row 0 of the batch as packed documents: (ids, labels, mask, Megatron's PackedSeqParams)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor([0] + DOCS, dtype=torch.int32).cumsum(0).to(torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                             cu_seqlens_kv_padded=cu, max_seqlen_q=max(DOCS), max_seqlen_kv=max(DOCS))
    return ids[:1], labels[:1], mask[:1], params


def token_loss(logits, labels, mask, num_tokens):
    """Sum of this rank's per-token losses over the global token count (the same function at CP=1)."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    return (ce * mask.reshape(-1)).sum() / num_tokens


def schedule_grads(model, local, num_tokens):
    """One training step as NeMo runs it: Megatron's schedule with NeMo's masked-token loss (its three
    outputs: the schedule divides by the rank's token count) and Megatron's DDP, which averages over
    data x context parallel; the aux-loss scale fix applied. Returns (main grads by name, the loss summed
    over CP ranks' token sums / ``num_tokens``)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from nemo_qwen3_next.training.fixes import fix_cp_aux_loss_scale

    fix_cp_aux_loss_scale()
    MoEAuxLossAutoScaler.main_loss_backward_scale = None  # as in a fresh training process (see the end)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, average_in_collective=True), model)
    ddp.zero_grad_buffer()

    def step(it, m):
        b = next(it)
        out = m(b["tokens"], b["position_ids"], b.get("attention_mask"), labels=b["labels"])

        def loss(per_token):
            total = (per_token.float() * b["loss_mask"]).sum()
            return total, b["loss_mask"].sum().to(torch.int), {"sum": total.detach().clone()}  # the schedule divides total in place
        return out, loss

    zeros = torch.zeros  # on CPU: the schedule makes its token counter with device="cuda"
    if not torch.cuda.is_available():
        torch.zeros = lambda *a, device=None, **k: zeros(*a, device="cpu" if device == "cuda" else device, **k)
    try:
        out = forward_backward_no_pipelining(forward_step_func=step, data_iterator=iter([local]), model=[ddp],
                                             num_microbatches=1, seq_length=0, micro_batch_size=0)
    finally:
        torch.zeros = zeros
        MoEAuxLossAutoScaler.main_loss_backward_scale = None  # the schedule's scale must not outlive its step
    ddp.finish_grad_sync()
    loss = out[0]["sum"].clone()
    if dist.is_initialized():
        dist.all_reduce(loss)
    return {n: p.main_grad.clone() for n, p in model.named_parameters()}, loss / num_tokens


def run(out_dir: str, name: str):
    from megatron.core import parallel_state

    from nemo_qwen3_next.parallel.context import gather_sequence, split_batch, split_packed

    cp, sp, thd = int(name.split("cp")[1].split("_")[0]), "_sp_" in name, name.endswith("_thd")
    parallel_state.destroy_model_parallel()  # the previous run's layout
    model, config, _ = tiny_tp_model(sp, cp=cp, linear_attention_chunk_size=CHUNK,
                                     linear_attention_recompute=name.endswith("_recompute"))
    model.train()  # dropout is 0; training mode applies the MoE aux loss
    group = parallel_state.get_context_parallel_group()
    ids, labels, mask = batch()
    params, cu = None, None
    if thd:
        ids, labels, mask, params = packed(ids, labels, mask)
        cu = params.cu_seqlens_q
    pos = torch.arange(SEQ).unsqueeze(0).expand_as(ids)
    full = {"tokens": ids, "position_ids": pos, "labels": labels, "loss_mask": mask}
    if thd:  # cu_seqlens stay global (Megatron's THD CP convention)
        local = {key: split_packed(val, cu, group) for key, val in full.items()}
        local["attention_mask"] = None
    else:  # with the dense causal mask NeMo sends without TE (True = masked), split along the queries
        full["attention_mask"] = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).triu(1).expand(BATCH, 1, SEQ, SEQ)
        local = split_batch(full, group)
    if name.endswith("_schedule"):  # NeMo's step: all tokens in the loss (equal counts per rank), aux loss on
        local["loss_mask"] = torch.ones_like(local["loss_mask"])
        grads, loss = schedule_grads(model, local, ids.numel())
        torch.save({"grads": grads, "loss": loss}, os.path.join(out_dir, f"{name}_rank{dist.get_rank()}.pt"))
        dist.barrier()
        return
    logits = model(local["tokens"], local["position_ids"], local["attention_mask"], packed_seq_params=params)
    loss = token_loss(logits, local["labels"], local["loss_mask"], mask.sum())
    loss.backward()
    reduce_replicated_grads(model, config)
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
    loss = loss.detach()
    dist.all_reduce(loss, group=group)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    full_logits = gather_sequence(logits.detach(), group, seq_dim=1, cu_seqlens=cu)
    torch.save({"logits": full_logits, "loss": loss, "grads": grads,
                "tp_rank": parallel_state.get_tensor_model_parallel_rank()},
               os.path.join(out_dir, f"{name}_rank{dist.get_rank()}.pt"))
    dist.barrier()


if __name__ == "__main__":
    for name in sys.argv[2:]:
        run(sys.argv[1], name)
