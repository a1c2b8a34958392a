"""Plain-PyTorch references for the gated delta rule (Qwen3-Next "GDN" core).

The recurrence, per value head, with state ``S`` of shape ``[K, V]``::

    S_t = exp(g_t) * S_{t-1}                       # gated decay (g is a log decay, <= 0)
    S_t = S_t + k_t (beta_t * (v_t - k_t^T S_t))^T  # delta rule: move k_t's read-out towards v_t
    o_t = (scale * q_t)^T S_t

Two formulations live here:

* :func:`recurrent_gated_delta_rule_ref` runs the recurrence token by token.  It is the
  ground truth, and the shape of single-token decoding.
* :func:`chunk_gated_delta_rule_ref` is the chunked WY/UT-transform form used by fla's
  kernels and HF's ``torch_chunk_gated_delta_rule``: inside a chunk of ``C`` tokens the
  ``C`` rank-1 updates are folded into one triangular solve, and only the chunk-to-chunk
  state hand-off is sequential.  Same math, ``T / C`` sequential steps instead of ``T``.

Layouts follow fla (sequence-major): q, k ``[B, T, Hk, K]``; v ``[B, T, Hv, V]``; g, beta
``[B, T, Hv]``; state ``[N, Hv, K, V]``.  ``Hv`` may be a multiple of ``Hk`` ("grouped value
heads"): value head ``j`` reads key/query head ``j // (Hv // Hk)``, which is exactly
``repeat_interleave`` along the head axis.

``cu_seqlens`` (packed/varlen, ``B == 1``) marks document boundaries: every document starts
from its own ``initial_state[n]`` (or zeros) and yields its own final state, so no state
leaks across documents.  Initial/final states are real inputs/outputs because context
parallelism and generation chain calls through them.

All math is done in at least fp32 (float64 inputs stay float64); ``o`` is cast back to
``v.dtype`` and the final state is returned in the compute dtype.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "l2norm",
    "recurrent_gated_delta_rule_ref",
    "chunk_gated_delta_rule_ref",
]


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-6) -> torch.Tensor:
    """``x * rsqrt(sum(x^2) + eps)`` computed in fp32 (HF's / fla's ``l2norm``), returned in fp32+."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return x * torch.rsqrt((x * x).sum(dim=dim, keepdim=True) + eps)


def _check_and_prepare(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm):
    """Validate shapes, l2norm/upcast, expand grouped heads; return head-major ``[B, H, T, *]``."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, Hk, K]; got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, Hk, K = k.shape
    if v.dim() != 4 or v.shape[:2] != (B, T):
        raise ValueError(f"v must be [B, T, Hv, V] matching q/k on B, T; got {tuple(v.shape)}")
    Hv, V = v.shape[2], v.shape[3]
    if Hv % Hk != 0:
        raise ValueError(f"num value heads ({Hv}) must be a multiple of num key heads ({Hk})")
    for name, t in (("g", g), ("beta", beta)):
        if t.shape != (B, T, Hv):
            raise ValueError(f"{name} must be [B, T, Hv] = {(B, T, Hv)}; got {tuple(t.shape)}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch size must be 1 (packed sequences); got B={B}")
        if cu_seqlens.dim() != 1 or int(cu_seqlens[-1]) != T or int(cu_seqlens[0]) != 0:
            raise ValueError(f"cu_seqlens must be 1-D, start at 0 and end at T={T}; got {cu_seqlens.tolist()}")
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (N, Hv, K, V):
        raise ValueError(f"initial_state must be [N, Hv, K, V] = {(N, Hv, K, V)}; got {tuple(initial_state.shape)}")

    dtype = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if scale is None:
        scale = K ** -0.5
    q, k, v, g, beta = (t.to(dtype).transpose(1, 2) for t in (q, k, v, g, beta))  # -> [B, H, T, *]
    if Hv != Hk:
        q = q.repeat_interleave(Hv // Hk, dim=1)
        k = k.repeat_interleave(Hv // Hk, dim=1)
    q = q * scale
    h0 = None if initial_state is None else initial_state.to(dtype)
    return q, k, v, g, beta, h0, N, dtype


def _segments(T: int, cu_seqlens: Optional[torch.Tensor]):
    if cu_seqlens is None:
        return [(0, T)]
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def _run_per_document(core, q, k, v, g, beta, h0, cu_seqlens, output_final_state, v_dtype):
    """Apply ``core`` ([B,H,T,*] tensors, state) -> (o, S) per document and reassemble."""
    B, H, T, K = k.shape
    V = v.shape[-1]
    outs, states = [], []
    for n, (s, e) in enumerate(_segments(T, cu_seqlens)):
        if cu_seqlens is None:
            S0 = h0 if h0 is not None else q.new_zeros(B, H, K, V)
        else:
            S0 = h0[n : n + 1] if h0 is not None else q.new_zeros(1, H, K, V)
        if e == s:  # empty document: no output, state passes through
            outs.append(v.new_zeros(B, H, 0, V))
            states.append(S0)
            continue
        o, S = core(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], g[:, :, s:e], beta[:, :, s:e], S0)
        outs.append(o)
        states.append(S)
    o = torch.cat(outs, dim=2).transpose(1, 2).contiguous().to(v_dtype)
    final = torch.cat(states, dim=0) if output_final_state else None
    return o, final


def _recurrent_core(q, k, v, g, beta, S):
    """Token-by-token recurrence, vectorised over batch and heads. Tensors ``[B, H, T, *]``."""
    outs = []
    for t in range(k.shape[2]):
        S = S * g[:, :, t].exp()[..., None, None]
        kv_mem = torch.einsum("bhk,bhkv->bhv", k[:, :, t], S)
        delta = (v[:, :, t] - kv_mem) * beta[:, :, t, None]
        S = S + k[:, :, t, :, None] * delta[:, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    return torch.stack(outs, dim=2), S


def recurrent_gated_delta_rule_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    use_qk_l2norm: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Step-by-step gated delta rule. Returns ``(o [B,T,Hv,V] in v.dtype, final_state [N,Hv,K,V] or None)``."""
    v_dtype = v.dtype
    q, k, v, g, beta, h0, _, _ = _check_and_prepare(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm)
    return _run_per_document(_recurrent_core, q, k, v, g, beta, h0, cu_seqlens, output_final_state, v_dtype)


def _make_chunk_core(chunk_size: int):
    def core(q, k, v, g, beta, S):
        """Chunked WY form on one (unpacked) sequence. Tensors ``[B, H, T, *]``, state ``[B, H, K, V]``."""
        B, H, T, K = k.shape
        V = v.shape[-1]
        C = chunk_size
        pad = (-T) % C
        if pad:
            # zero k/beta/g in the pad: rows become identity in the solve, contribute nothing
            # to the state and do not decay it, so outputs [:T] and the final state are exact.
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
            g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
        n_chunks = (T + pad) // C
        q, k, v = (t.reshape(B, H, n_chunks, C, t.shape[-1]) for t in (q, k, v))
        g = g.reshape(B, H, n_chunks, C).cumsum(-1)  # within-chunk cumulative log decay
        beta = beta.reshape(B, H, n_chunks, C)

        k_beta = k * beta[..., None]
        v_beta = v * beta[..., None]
        # decay[i, j] = exp(G_i - G_j) for j <= i (inner tril keeps exp from overflowing above the diagonal)
        decay = (g[..., :, None] - g[..., None, :]).tril().exp().tril()
        ones = torch.ones(C, C, dtype=torch.bool, device=q.device)
        strict_lower, causal = ones.tril(-1), ones.tril()
        # UT transform: T_mat = (I - M)^-1 with M = -strict_lower(diag(beta) K K^T * decay).
        # HF computes the same inverse by forward substitution in a python loop.
        M = -(k_beta @ k.transpose(-1, -2) * decay).masked_fill(~strict_lower, 0)
        eye = torch.eye(C, dtype=q.dtype, device=q.device)
        T_mat = torch.linalg.solve_triangular(eye - M, eye.expand_as(M), upper=False, unitriangular=True)
        u = T_mat @ v_beta  # pseudo-values, before correcting for the incoming state
        w = T_mat @ (k_beta * g.exp()[..., None])  # how the incoming state leaks into them

        outs = []
        for i in range(n_chunks):
            q_i, k_i, g_i = q[:, :, i], k[:, :, i], g[:, :, i]
            v_new = u[:, :, i] - w[:, :, i] @ S
            attn = (q_i @ k_i.transpose(-1, -2) * decay[:, :, i]).masked_fill(~causal, 0)
            outs.append((q_i * g_i.exp()[..., None]) @ S + attn @ v_new)
            g_last = g_i[..., -1]
            S = S * g_last.exp()[..., None, None] + (
                k_i * (g_last[..., None] - g_i).exp()[..., None]
            ).transpose(-1, -2) @ v_new
        o = torch.stack(outs, dim=2).reshape(B, H, n_chunks * C, V)[:, :, :T]
        return o, S

    return core


def chunk_gated_delta_rule_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
    use_qk_l2norm: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Chunked (WY/UT) gated delta rule; same math as HF's ``torch_chunk_gated_delta_rule``.

    Any ``T`` works (each document is padded to a multiple of ``chunk_size`` and unpadded).
    With ``cu_seqlens`` each document is processed separately (vectorised over heads).
    Returns ``(o [B,T,Hv,V] in v.dtype, final_state [N,Hv,K,V] or None)``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    v_dtype = v.dtype
    q, k, v, g, beta, h0, _, _ = _check_and_prepare(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm)
    return _run_per_document(
        _make_chunk_core(chunk_size), q, k, v, g, beta, h0, cu_seqlens, output_final_state, v_dtype
    )
