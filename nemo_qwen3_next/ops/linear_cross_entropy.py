"""LM head + cross-entropy as one op: per-token loss without fp32 logits for the whole batch.

Megatron's unfused path computes bf16 logits ``[s, b, V]``, casts them to fp32 and runs its
vocab-parallel cross-entropy, which keeps an fp32 softmax for the backward: at vocab 151936 and
8K tokens that is ~5 GB of fp32 traffic several times over, plus the bf16 logits themselves.

``linear_cross_entropy`` computes the logits chunk by chunk into one bf16 buffer and, right away,
turns each chunk into its gradient ``softmax - onehot`` in place (the per-token loss comes out of the
same pass). The backward is then just two GEMMs with the per-token upstream gradient ``g`` folded in:
``dx = g ⊙ (D @ W)`` and ``dW = Dᵀ @ (g ⊙ x)``. This is exact for any ``g`` (loss masks, any
reduction), unlike kernels that precompute ``dW`` for a mean loss, and it never rounds more than
the unfused path (whose logits gradient also reaches the GEMMs in bf16).

Under tensor parallelism ``weight`` is this rank's vocab shard and ``group`` the TP group: the
log-sum-exp and the target logit are reduced across it (vocab-parallel, as Megatron's loss).

Dispatch: fla's Triton cross-entropy kernels (``fla.modules.fused_cross_entropy``, the flash-attn
lineage: one read for the log-sum-exp, one read + write for the in-place gradient) for CUDA tensors;
``_ce_chunk_ref``, plain torch in fp32, elsewhere. Both write the same quantities.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.distributed as dist

from .usage import record

__all__ = ["linear_cross_entropy", "linear_cross_entropy_ref"]

_BACKENDS = ("auto", "torch", "fla")
# tokens per chunk of the torch reference: bounds its fp32 temporaries to CHUNK x V x 4 bytes
REF_CHUNK_TOKENS = 1024


@functools.lru_cache(maxsize=None)
def _load_fla_ce():
    try:
        from fla.modules.fused_cross_entropy.ops import cross_entropy_bwd, cross_entropy_fwd
    except Exception:
        return None
    return cross_entropy_fwd, cross_entropy_bwd


def _world(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _ce_chunk_ref(logits: torch.Tensor, target: torch.Tensor, group) -> torch.Tensor:
    """In place: ``logits`` [C, Vl] -> ``softmax - onehot`` (its dtype); returns the fp32 loss [C]."""
    vl = logits.shape[-1]
    start = (dist.get_rank(group) if _world(group) > 1 else 0) * vl
    lf = logits.float()
    m = lf.max(-1).values
    if _world(group) > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    e = torch.exp(lf - m[:, None])
    s = e.sum(-1)
    local = (target >= start) & (target < start + vl)
    idx = (target - start).clamp(0, vl - 1)
    tgt = torch.where(local, lf.gather(1, idx[:, None])[:, 0], torch.zeros_like(m))
    if _world(group) > 1:
        dist.all_reduce(s, group=group)
        dist.all_reduce(tgt, group=group)
    lse = m + torch.log(s)
    e /= s[:, None]
    e[torch.arange(len(idx), device=idx.device)[local], idx[local]] -= 1.0
    logits.copy_(e)
    return lse - tgt


def _ce_chunk_fla(logits: torch.Tensor, target: torch.Tensor, group, fns) -> torch.Tensor:
    fwd, bwd = fns
    loss, _, lse, total_classes, class_start = fwd(logits=logits, target=target, process_group=group)
    bwd(logits=logits, target=target, lse=lse, dloss=torch.ones_like(loss), total_classes=total_classes,
        class_start_idx=class_start, inplace_backward=True)
    return loss.float()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, target, group, chunk, fns):
        n, vl = x.shape[0], weight.shape[0]
        grad_logits = torch.empty(n, vl, device=x.device, dtype=x.dtype)  # becomes D = softmax - onehot
        loss = torch.empty(n, device=x.device, dtype=torch.float32)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            torch.matmul(x[s:e], weight.t(), out=grad_logits[s:e])
            c = grad_logits[s:e]
            loss[s:e] = _ce_chunk_fla(c, target[s:e], group, fns) if fns else _ce_chunk_ref(c, target[s:e], group)
        ctx.save_for_backward(x, weight, grad_logits)
        return loss

    @staticmethod
    def backward(ctx, g):
        x, weight, d = ctx.saved_tensors
        g = g.float()[:, None]
        dx = (torch.matmul(d, weight).float() * g).to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = torch.matmul(d.t(), (x.float() * g).to(x.dtype)) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         group: Optional[dist.ProcessGroup] = None, backend: str = "auto",
                         chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """Per-token ``-log softmax(x @ weightᵀ)[target]`` in fp32, shape ``x.shape[:-1]``.

    ``x``: ``[..., H]`` (this rank's full sequence under TP); ``weight``: ``[V/tp, H]``, this rank's
    vocab shard; ``target``: global token ids, ``x.shape[:-1]``; ``group``: the TP group (None = one
    rank). backend: ``"auto"`` (fla's kernels for CUDA tensors when importable), ``"torch"``, ``"fla"``.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if target.shape != x.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} must be the hidden states' {tuple(x.shape[:-1])}")
    fns = None if backend == "torch" or (backend == "auto" and not x.is_cuda) else _load_fla_ce()
    if fns is None and backend == "fla":
        raise ImportError("backend='fla' for the fused linear cross-entropy needs fla: `pip install fla-core`")
    record("linear_cross_entropy", "fla" if fns else "torch")
    shape = x.shape[:-1]
    x2, t2 = x.reshape(-1, x.shape[-1]), target.reshape(-1)
    # the kernel path has no fp32 temporaries: one chunk; the reference bounds its fp32 copies
    chunk = chunk_tokens or (x2.shape[0] if fns else REF_CHUNK_TOKENS)
    return _LinearCrossEntropy.apply(x2, weight, t2, group, max(1, chunk), fns).view(shape)


def linear_cross_entropy_ref(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The unfused definition (one rank): fp32 logits, then cross-entropy per token."""
    logits = torch.matmul(x, weight.t()).float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, -2), target.flatten(), reduction="none").view(
        target.shape
    )
