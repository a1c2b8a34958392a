"""Context parallelism (CP) for the hybrid model, on Megatron's sequence layout.

Layout (Megatron's ``get_batch_on_this_cp_rank``): the sequence is cut into ``2·CP`` equal chunks
and CP rank ``r`` holds chunks ``r`` and ``2·CP-1-r``, in that order, so every rank gets the same
causal-attention work and NeMo's data path is unchanged. Packed documents follow Megatron / TE's THD
convention instead: every document (padded to a multiple of 2·CP) is cut into 2·CP chunks, rank ``r``
holds chunks ``r`` and ``2·CP-1-r`` of each, and ``cu_seqlens`` stay global; the exchanges below then
run per document (``b`` reads "documents").

What crosses ranks, per layer (``L`` = tokens per chunk, ``b`` = micro-batch):

* causal conv (GDN): the last ``W-1`` conv inputs of every chunk, all-gathered (each chunk takes
  its left context from the chunk before it); ``2·CP·b·(W-1)·channels`` values.
* gated delta rule (GDN), exact state passing: each chunk runs the rule from a zero state *and*
  from the identity, as one call with ``[v | 0]`` and initial state ``[0 | I]`` (the rule acts on
  every state column alone, so that is two runs in one). It yields the chunk's final state ``F``
  ``[Hv, Dk, Dv]`` and its transition ``P`` ``[Hv, Dk, Dk]`` (``S_out = P·S_in + F``), plus
  ``o_P``, each token's read-out of ``P``. ``[F | P]`` is all-gathered (``2·CP·b·Hv·Dk·(Dk+Dv)``
  fp32 values, no activations), every rank chains ``S_in(c+1) = P_c·S_in(c) + F_c`` from
  ``S_in(0) = 0`` and corrects its outputs exactly: ``o = o_0 + o_P·S_in``. No head count is
  involved, so any CP size works.
* attention: K and V all-gathered (``2·CP·L·b·groups·head_dim`` each); queries attend with the
  causal offsets of their own chunks.

All gathers are Megatron's ``gather_from_sequence_parallel_region`` on the CP group, whose backward
reduce-scatters the gradients to their owners, so forward and backward run through autograd.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from ..ops import causal_conv1d, gated_delta_rule


def cp_group_or_none(pg_collection) -> Optional[torch.distributed.ProcessGroup]:
    """The CP group from a Megatron ``ProcessGroupCollection``, or None when CP is off (size 1)."""
    group = getattr(pg_collection, "cp", None)
    return group if group is not None and group.size() > 1 else None


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """``[n, ...]`` -> ``[size·n, ...]`` in rank order; backward reduce-scatters."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    return gather_from_sequence_parallel_region(x.contiguous(), tensor_parallel_output_grad=True, group=group)


def _local_chunks(rank: int, size: int):
    """Global indices of the two chunks CP rank ``rank`` holds."""
    return rank, 2 * size - 1 - rank


def _gathered_index(chunk: int, size: int) -> int:
    """Where global chunk ``chunk`` sits in a rank-order gather of ``[2, ...]`` per rank."""
    return 2 * chunk if chunk < size else 2 * (2 * size - 1 - chunk) + 1


def local_positions(local_len: int, rank: int, size: int, device=None) -> torch.Tensor:
    """Global token positions of CP rank ``rank``'s ``local_len`` tokens (two chunks of ``local_len // 2``)."""
    L = local_len // 2
    return torch.cat([torch.arange(c * L, (c + 1) * L, device=device) for c in _local_chunks(rank, size)])


def _documents(cu_seqlens: torch.Tensor, size: int):
    """Per packed document ``(global start, chunk length m)``; each document is cut into 2·CP chunks."""
    bounds = cu_seqlens.tolist()
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        if (e - s) % (2 * size):
            raise ValueError(f"packed document {i} has {e - s} tokens, not a multiple of 2 x context_parallel_size = "
                             f"{2 * size}; pad every document to a multiple of {2 * size} (cu_seqlens_q_padded).")
    return [(s, (e - s) // (2 * size)) for s, e in zip(bounds[:-1], bounds[1:])]


def thd_positions(cu_seqlens: torch.Tensor, rank: int, size: int, device=None) -> torch.Tensor:
    """Global positions of CP rank ``rank``'s tokens of a packed batch (global ``cu_seqlens``, padded):
    Megatron / TransformerEngine's THD layout, chunks r and 2·CP-1-r of every document, in document order."""
    return torch.cat([torch.arange(s + c * m, s + (c + 1) * m, device=device)
                      for s, m in _documents(cu_seqlens, size) for c in _local_chunks(rank, size)])


def _positions(local_len: int, rank: int, size: int, cu_seqlens=None, device=None) -> torch.Tensor:
    """Global positions of a rank's tokens, unpacked (`local_positions`) or packed (`thd_positions`)."""
    if cu_seqlens is None:
        return local_positions(local_len, rank, size, device)
    return thd_positions(cu_seqlens, rank, size, device)


def split_packed(x: torch.Tensor, cu_seqlens: torch.Tensor, group, seq_dim: int = 1) -> torch.Tensor:
    """This CP rank's tokens of a packed tensor (THD layout, see `thd_positions`); ``cu_seqlens`` stay global."""
    return x.index_select(seq_dim, thd_positions(cu_seqlens, group.rank(), group.size(), x.device))


def split_batch(batch: Dict[str, Optional[torch.Tensor]], group=None) -> Dict[str, Optional[torch.Tensor]]:
    """This CP rank's part of a ``[b, s]`` batch (``attention_mask`` ``[b, 1, s, s]``): Megatron's split,
    after a one-line check that ``s`` is divisible by ``2·CP``. Returns a new dict."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    size = group.size() if group is not None else parallel_state.get_context_parallel_world_size()
    for key, val in batch.items():
        if val is not None:
            s = val.shape[2 if key == "attention_mask" else 1]
            if s % (2 * size):
                fix = (s // (2 * size) + 1) * 2 * size
                raise ValueError(f"sequence length {s} ({key}) is not divisible by 2 x context_parallel_size = "
                                 f"{2 * size}; pad or cut sequences to a multiple of {2 * size} (e.g. {fix}).")
    return get_batch_on_this_cp_rank(dict(batch))


def gather_sequence(x: torch.Tensor, group, seq_dim: int = 1, cu_seqlens=None) -> torch.Tensor:
    """Inverse of `split_batch` (or, with ``cu_seqlens``, `split_packed`) for one tensor: every rank's
    part, back in global sequence order."""
    size, n = group.size(), x.shape[seq_dim]
    pos = torch.cat([_positions(n, r, size, cu_seqlens, x.device) for r in range(size)])
    return _all_gather(x.movedim(seq_dim, 0), group)[torch.argsort(pos)].movedim(0, seq_dim)


def _chunks_to_batch(x: torch.Tensor) -> torch.Tensor:
    """``[b, 2L, ...]`` -> ``[2b, L, ...]`` (first chunk's rows, then the second's)."""
    b, s = x.shape[:2]
    return x.reshape(b, 2, s // 2, *x.shape[2:]).transpose(0, 1).reshape(2 * b, s // 2, *x.shape[2:])


def _batch_to_chunks(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `_chunks_to_batch`."""
    b2, L = x.shape[:2]
    return x.reshape(2, b2 // 2, L, *x.shape[2:]).transpose(0, 1).reshape(b2 // 2, 2 * L, *x.shape[2:])


def _check_local_len(s: int, what: str, min_chunk: int = 1) -> None:
    if s % 2 or s // 2 < min_chunk:
        raise ValueError(f"{what} under context parallelism needs the local sequence to be two equal chunks of "
                         f">= {min_chunk} tokens (Megatron's CP split); got {s} local tokens.")


def _segments_cu(docs, device) -> torch.Tensor:
    """Local ``cu_seqlens`` of a packed rank's segments: per document its two chunks of ``m`` tokens."""
    lens = [m for _, m in docs for _ in range(2)]
    return torch.tensor([0] + lens, device=device).cumsum(0)


def causal_conv1d_cp(x: torch.Tensor, weight: torch.Tensor, bias=None, activation="silu", *, group,
                     cu_seqlens=None, backend: str = "auto"):
    """`ops.causal_conv1d` on this rank's chunks, each continuing the chunk before it in the global
    sequence (or its packed document): ``x`` ``[b, 2L, D]``, or ``[1, t, D]`` with global ``cu_seqlens``."""
    size = group.size()
    tails = conv_tails(x, weight.shape[1] - 1, cu_seqlens, size)
    tails = None if tails is None else _all_gather(tails, group)
    return conv_with_left_context(x, weight, bias, activation, tails, group.rank(), size, backend, cu_seqlens), None


def conv_tails(x: torch.Tensor, W1: int, cu_seqlens=None, size: int = 1) -> Optional[torch.Tensor]:
    """What this rank sends for the conv: the last ``W1`` inputs of each of its chunks, ``[2, b, W1, D]``
    (packed: ``[2, documents, W1, D]``, a chunk shorter than ``W1`` left-padded with zeros)."""
    if cu_seqlens is None:
        _check_local_len(x.shape[1], "the causal conv", max(W1, 1))
    if not W1:
        return None
    if cu_seqlens is None:
        x2 = _chunks_to_batch(x)
        return x2[:, x2.shape[1] - W1:].reshape(2, x.shape[0], W1, x.shape[2])
    starts = _segments_cu(_documents(cu_seqlens, size), x.device).tolist()
    tails = [F.pad(x[0, max(s, e - W1):e], (0, 0, W1 - min(e - s, W1), 0)) for s, e in zip(starts[:-1], starts[1:])]
    return torch.stack(tails).reshape(-1, 2, W1, x.shape[2]).transpose(0, 1)


def conv_with_left_context(x, weight, bias, activation, tails, rank: int, size: int, backend: str = "auto",
                           cu_seqlens=None):
    """The conv of rank ``rank``'s chunks ``x`` given every rank's `conv_tails` (rank order)."""
    if cu_seqlens is None:
        x2 = _chunks_to_batch(x)  # [2b, L, D]
        initial = None
        if tails is not None:
            left = [tails[_gathered_index(c - 1, size)] if c > 0 else torch.zeros_like(tails[0])
                    for c in _local_chunks(rank, size)]
            initial = torch.cat(left, dim=0).transpose(1, 2)  # [2b, D, W-1]
        y, _ = causal_conv1d(x2, weight, bias, activation, initial_state=initial, backend=backend)
        return _batch_to_chunks(y)
    docs = _documents(cu_seqlens, size)
    initial = None
    if tails is not None:
        W1, left = tails.shape[2], []
        for i, (_, m) in enumerate(docs):
            for c in _local_chunks(rank, size):
                # the document's last W-1 inputs before chunk c: a chunk shorter than W-1 takes several
                prev = [tails[_gathered_index(p, size), i, W1 - min(m, W1):] for p in range(c)]
                ctx = torch.cat([tails.new_zeros(W1, tails.shape[-1])] + prev, dim=0)[-W1:]
                left.append(ctx)
        initial = torch.stack(left).transpose(1, 2)  # [2·documents, D, W-1]
    y, _ = causal_conv1d(x, weight, bias, activation, cu_seqlens=_segments_cu(docs, x.device),
                         initial_state=initial, backend=backend)
    return y


def gated_delta_rule_cp(q, k, v, g, beta, *, group, initial_state=None, output_final_state=False,
                        cu_seqlens=None, **kwargs):
    """`ops.gated_delta_rule` on this rank's chunks (``[b, 2L, H, *]``, or ``[1, t, H, *]`` with global
    ``cu_seqlens``), exact for the global sequence by state passing (module docstring). Keywords as
    `ops.gated_delta_rule`; returns ``(o, None)``."""
    if initial_state is not None or output_final_state:
        raise NotImplementedError("initial/final states are not supported under context parallelism.")
    size = group.size()
    o0, o_p, states = chunk_states(q, k, v, g, beta, cu_seqlens=cu_seqlens, size=size, **kwargs)
    return correct_with_states(o0, o_p, _all_gather(states, group), group.rank(), size, cu_seqlens), None


def chunk_states(q, k, v, g, beta, *, cu_seqlens=None, size: int = 1, **kwargs):
    """This rank's local part: the rule on its chunks from ``[0 | I]`` with ``[v | 0]``.

    Returns ``o0`` (zero-state outputs) and ``o_p`` (read-outs of the transition), ``[2b, L, Hv, *]``
    (packed: ``[1, t, Hv, *]``), and what it sends, ``[F | P]`` ``[2, b or documents, Hv, Dk, Dv+Dk]`` in
    the compute dtype (at least fp32)."""
    seg_cu = None
    if cu_seqlens is None:
        _check_local_len(q.shape[1], "the gated delta rule")
        q, k, v, g, beta = (_chunks_to_batch(t) for t in (q, k, v, g, beta))
        n = v.shape[0]
    else:
        seg_cu = _segments_cu(_documents(cu_seqlens, size), q.device)
        n = seg_cu.numel() - 1
    _, L, Hv, V = v.shape
    K = k.shape[-1]
    dtype = torch.promote_types(v.dtype, torch.float32)  # the rule's compute dtype (its state's)
    v_aug = torch.cat([v, v.new_zeros(*v.shape[:3], K)], dim=-1)
    eye = torch.eye(K, dtype=dtype, device=v.device).expand(n, Hv, K, K)
    s0 = torch.cat([eye.new_zeros(n, Hv, K, V), eye], dim=-1)
    o_aug, s_aug = gated_delta_rule(q, k, v_aug, g, beta, initial_state=s0, output_final_state=True,
                                    cu_seqlens=seg_cu, **kwargs)
    o0, o_p = o_aug.split([V, K], dim=-1)
    s_aug = s_aug.to(dtype)
    if cu_seqlens is None:
        return o0, o_p, s_aug.reshape(2, n // 2, Hv, K, V + K)
    return o0, o_p, s_aug.reshape(n // 2, 2, Hv, K, V + K).transpose(0, 1)


def correct_with_states(o0, o_p, states, rank: int, size: int, cu_seqlens=None) -> torch.Tensor:
    """Rank ``rank``'s exact outputs from its `chunk_states` outputs and every rank's ``[F | P]``
    (rank order, ``[2·size, n, Hv, Dk, Dv+Dk]``): chain the states, add ``o_p · S_in``."""
    _, n, Hv, K, VK = states.shape
    V = VK - K
    mine = _local_chunks(rank, size)
    s_in, start = {}, states.new_zeros(n, Hv, K, V)
    for c in range(max(mine) + 1):  # S_in(c+1) = P_c · S_in(c) + F_c, for all rows / documents at once
        if c in mine:
            s_in[c] = start
        f_c, p_c = states[_gathered_index(c, size)].split([V, K], dim=-1)
        start = p_c @ start + f_c
    out_dtype, o0, o_p = o0.dtype, o0.to(states.dtype), o_p.to(states.dtype)
    if cu_seqlens is None:
        s_in = torch.cat([s_in[c] for c in mine], dim=0)  # [2b, Hv, K, V]
        return _batch_to_chunks((o0 + torch.einsum("blhk,bhkv->blhv", o_p, s_in)).to(out_dtype))
    bounds = _segments_cu(_documents(cu_seqlens, size), o0.device).tolist()
    segs = [s_in[c][i] for i in range(n) for c in mine]  # local order: per document its two chunks
    out = [o0[:, a:e] + torch.einsum("blhk,hkv->blhv", o_p[:, a:e], sv)
           for (a, e), sv in zip(zip(bounds[:-1], bounds[1:]), segs)]
    return torch.cat(out, dim=1).to(out_dtype)


def gather_kv(key: torch.Tensor, value: torch.Tensor, group, attention_mask: Optional[torch.Tensor] = None,
              cu_seqlens: Optional[torch.Tensor] = None):
    """All-gather K/V (``[sk, b, ng, hn]``, or packed ``[t, ng, hn]`` with global ``cu_seqlens``) over CP;
    return them with the boolean ``[sq, sk_all]`` mask (True = may attend) that gives this rank's queries
    their global causal offsets (and, packed, keeps them inside their document).

    ``attention_mask`` (Megatron's, True = masked) is the one `split_batch` leaves: queries local,
    keys in global order; its key columns are permuted to the gathered order."""
    s = key.shape[0]
    if cu_seqlens is None:
        _check_local_len(s, "attention")
    size = group.size()
    key_all, value_all = _all_gather(key, group), _all_gather(value, group)  # rank order
    kpos = torch.cat([_positions(s, r, size, cu_seqlens, key.device) for r in range(size)])
    qpos = _positions(s, group.rank(), size, cu_seqlens, key.device)
    mask = qpos[:, None] >= kpos[None, :]
    if cu_seqlens is not None:
        ends = cu_seqlens.to(key.device)[1:]
        mask = mask & (torch.bucketize(qpos, ends, right=True)[:, None] == torch.bucketize(kpos, ends, right=True))
    if attention_mask is not None:
        mask = mask & ~attention_mask[..., kpos]
    return key_all, value_all, mask
