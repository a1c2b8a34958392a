"""Depthwise causal short convolution over the GDN's fused q/k/v channels.

``y[t, d] = act(bias[d] + sum_{j<W} weight[d, j] * x[t - (W-1) + j, d])``, with the missing
history (``t - (W-1) + j < 0``) taken from ``initial_state`` or zeros.  This is HF's
``F.silu(nn.Conv1d(D, D, W, groups=D, padding=W-1)(x)[..., :T])`` in channels-last form
(``x: [B, T, D]``, the layout the GDN works in), plus the two things CP and generation need:

* ``cu_seqlens`` (packed input, ``B == 1``): every document is convolved alone, starting from
  zero history (or its ``initial_state[n]``), so nothing leaks across document boundaries;
* states ``[N, D, W-1]``: the last ``W-1`` inputs of each sequence (its left context for the
  next call).  Chaining calls through the state equals one call on the concatenation.

``causal_conv1d_update`` is the one-token form for decoding: it reads and advances the state in
place (fixed addresses, no allocation that depends on data), so a CUDA graph can capture it.

Backends ("auto" on CUDA, tried in order; imports are lazy since all need a GPU stack):

0. ``triton``: ours (`causal_conv1d_triton`), for calls without ``cu_seqlens`` or states and width
   <= 4 (every training step without packing): one pass each way, the pre-activation recomputed in
   registers, the optional per-head L2-norm fused. "auto" takes it where `own_kernels.enabled()` (the
   default where triton imports; ``QWEN3_NEXT_OWN_KERNELS=0`` for the vendors' kernels).
1. ``causal_conv1d`` (Dao-AILab): ``causal_conv1d_fn(x [B, D, T], weight [D, W], bias,
   seq_idx [B, T] int32, initial_states [B, D, W-1], return_final_states, activation)``.
   It cannot combine ``seq_idx`` with initial/final states, so packed input that needs
   states goes to the next backend.
2. fla's Triton conv: ``fla.modules.convolution.causal_conv1d(x [B, T, D], weight [D, W],
   bias, residual, initial_state [N, D, W], output_final_state, activation, ..., cu_seqlens)``
   returning ``(y, final_state [N, D, W])``; fla keeps a W-wide cache whose first column is
   never read, so we pad/unpad one column.
3. the torch reference.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import own_kernels
from .gated_delta_rule_ref import l2norm
from .usage import record

__all__ = ["causal_conv1d", "causal_conv1d_ref", "causal_conv1d_update"]

_BACKENDS = ("auto", "torch", "triton", "causal_conv1d", "fla")
_ACTIVATIONS = (None, "silu", "swish")


def _check(x, weight, bias, activation, cu_seqlens, initial_state, check_values=True, l2norm_head_dim=None):
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, D] (channels last); got {tuple(x.shape)}")
    B, T, D = x.shape
    if weight.dim() != 2 or weight.shape[0] != D:
        raise ValueError(f"weight must be [D, W] = [{D}, W]; got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (D,):
        raise ValueError(f"bias must be [D] = [{D}]; got {tuple(bias.shape)}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if l2norm_head_dim is not None and (l2norm_head_dim <= 0 or D % l2norm_head_dim):
        raise ValueError(f"l2norm_head_dim must be a positive divisor of the channel count D={D}; got {l2norm_head_dim}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch size must be 1 (packed sequences); got B={B}")
        if cu_seqlens.dim() != 1 or (check_values and (int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T)):
            raise ValueError(f"cu_seqlens must be 1-D, start at 0 and end at T={T}; got {cu_seqlens.tolist()}")
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    W = weight.shape[1]
    if initial_state is not None and initial_state.shape != (N, D, W - 1):
        raise ValueError(f"initial_state must be [N, D, W-1] = {(N, D, W - 1)}; got {tuple(initial_state.shape)}")


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = "silu",
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    l2norm_head_dim: Optional[int] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Reference conv: prepend history, ``F.conv1d(groups=D)``, activation (then the optional per-head
    L2-norm, `l2norm`); math in fp32+.

    Returns ``(y [B, T, D] in x.dtype, final_state [N, D, W-1] in x.dtype or None)``.
    """
    _check(x, weight, bias, activation, cu_seqlens, initial_state, l2norm_head_dim=l2norm_head_dim)
    B, T, D = x.shape
    W = weight.shape[1]
    dtype = torch.promote_types(x.dtype, torch.float32)
    w = weight.to(dtype).unsqueeze(1)  # [D, 1, W]
    b = None if bias is None else bias.to(dtype)
    xt = x.to(dtype).transpose(1, 2)  # [B, D, T]
    h0 = None if initial_state is None else initial_state.to(dtype)

    def run(x_seg, hist):  # x_seg [n, D, L], hist [n, D, W-1]
        xx = torch.cat([hist, x_seg], dim=-1)
        y = F.conv1d(xx, w, b, groups=D)  # length L exactly: causal by construction
        return y, xx[..., xx.shape[-1] - (W - 1):]

    if cu_seqlens is None:
        hist = h0 if h0 is not None else xt.new_zeros(B, D, W - 1)
        y, final = run(xt, hist)
    else:
        bounds = cu_seqlens.tolist()
        ys, finals = [], []
        for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            hist = h0[n : n + 1] if h0 is not None else xt.new_zeros(1, D, W - 1)
            y_n, f_n = run(xt[..., s:e], hist)
            ys.append(y_n)
            finals.append(f_n)
        y, final = torch.cat(ys, dim=-1), torch.cat(finals, dim=0)
    if activation is not None:
        y = F.silu(y)
    y = y.transpose(1, 2)
    if l2norm_head_dim is not None:
        y = _l2norm_heads(y, l2norm_head_dim)
    y = y.contiguous().to(x.dtype)
    return y, (final.to(x.dtype) if output_final_state else None)


def _l2norm_heads(y: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``y [B, T, D]`` with each group of ``head_dim`` channels L2-normalised (`l2norm`, fp32+)."""
    B, T, D = y.shape
    return l2norm(y.reshape(B, T, D // head_dim, head_dim)).reshape(B, T, D)


@functools.lru_cache(maxsize=None)
def _load_dao():
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        return None
    return causal_conv1d_fn


@functools.lru_cache(maxsize=None)
def _load_fla_conv():
    try:
        from fla.modules.convolution import causal_conv1d as fla_causal_conv1d
    except Exception:
        return None
    params = inspect.signature(fla_causal_conv1d).parameters
    # Old fla (before late 2024) was head-first with an `initial_states` keyword: not supported.
    if not {"residual", "initial_state", "cu_seqlens", "output_final_state"} <= set(params):
        return None
    return fla_causal_conv1d


def _dao_conv(fn, x, weight, bias, activation, cu_seqlens, initial_state, output_final_state):
    x_cl = x if x.stride(-1) == 1 else x.contiguous()
    x_cl = x_cl.transpose(1, 2)  # [B, D, T] view with channel-last memory, which the kernel needs for states
    seq_idx = None
    if cu_seqlens is not None:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(x.device)
        seq_idx = torch.repeat_interleave(
            torch.arange(lengths.numel(), device=x.device, dtype=torch.int32), lengths, output_size=x.shape[1]
        ).unsqueeze(0)
    h0 = None
    if initial_state is not None:  # the kernel wants stride(1) == 1 for channel-last states
        h0 = initial_state.to(x.dtype).transpose(1, 2).contiguous().transpose(1, 2)
    out = fn(
        x_cl,
        weight,
        bias,
        seq_idx=seq_idx,
        initial_states=h0,
        return_final_states=output_final_state,
        activation=activation,
    )
    y, final = out if output_final_state else (out, None)
    return y.transpose(1, 2), final


def _fla_conv(fn, x, weight, bias, activation, cu_seqlens, initial_state, output_final_state):
    W = weight.shape[1]
    h0 = None if initial_state is None else F.pad(initial_state.to(x.dtype), (1, 0))  # [N, D, W]
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=x.device, dtype=torch.long)
    y, final = fn(
        x=x,
        weight=weight,
        bias=bias,
        initial_state=h0,
        output_final_state=output_final_state,
        activation=activation,
        cu_seqlens=cu_seqlens,
    )
    if output_final_state and final is not None and final.shape[-1] == W:
        final = final[..., 1:]
    return y, (final if output_final_state else None)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = "silu",
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    l2norm_head_dim: Optional[int] = None,
    grad_sink=None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Causal depthwise conv on ``x [B, T, D]`` with ``weight [D, W]``.

    Args:
        activation: ``"silu"`` (= ``"swish"``) or ``None``.
        l2norm_head_dim: after the activation, L2-normalise each group of that many channels (in fp32,
            eps 1e-6: the GDN's q/k norm, which then need not run in the chunk kernel). Fused into our
            Triton kernel (the output is written once, the backward reuses the forward's per-head rstd);
            the other backends run `l2norm` after the conv.
        cu_seqlens: 1-D document offsets for packed input (``B == 1``); no leakage across documents.
        initial_state: ``[N, D, W-1]`` left context per sequence (``N = B`` or number of documents).
        output_final_state: also return the last ``W-1`` inputs per sequence, ``[N, D, W-1]``.
        grad_sink: where x is a view of a GEMM output split by `grad_sink.column_views`, its sink: our kernel
            writes dx into x's place in the shared gradient (the other backends' dx is copied there).
        backend: ``"auto"`` | ``"torch"`` | ``"triton"`` | ``"causal_conv1d"`` | ``"fla"``; forcing a
            missing package (or ``"triton"`` on a call it does not cover) raises.

    Returns ``(y [B, T, D], final_state or None)``.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    _check(x, weight, bias, activation, cu_seqlens, initial_state, check_values=not x.is_cuda,  # no GPU syncs
           l2norm_head_dim=l2norm_head_dim)
    args = (x, weight, bias, activation, cu_seqlens, initial_state, output_final_state)
    if not (backend == "torch" or (backend == "auto" and not x.is_cuda)):
        out = _run_kernel(backend, args, l2norm_head_dim, grad_sink)
        if out is not None:
            return out
    record("causal_conv1d", "torch")
    return causal_conv1d_ref(
        x, weight, bias, activation, cu_seqlens=cu_seqlens, initial_state=initial_state,
        output_final_state=output_final_state, l2norm_head_dim=l2norm_head_dim,
    )


def _ours_cover(x, weight, cu_seqlens, initial_state, output_final_state) -> bool:
    """Whether our Triton conv takes this call: CUDA, no packing or states, width <= 4, unit channel stride."""
    return (
        x.is_cuda
        and cu_seqlens is None
        and initial_state is None
        and not output_final_state
        and weight.shape[1] <= 4
        and x.stride(-1) == 1
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
    )


def _run_kernel(backend: str, args, l2norm_head_dim=None, grad_sink=None):
    """Ours, Dao's kernel or fla's Triton conv for `backend` (the L2-norm fused into ours where it can be,
    else after the vendor's conv); None when `auto` finds none usable."""
    out = _run_conv_kernel(backend, args, l2norm_head_dim, grad_sink)
    if out is None:
        return None
    y, final, normed = out
    if l2norm_head_dim is not None and not normed:
        y = _l2norm_heads(y, l2norm_head_dim).to(y.dtype)
    return y, final


def _run_conv_kernel(backend: str, args, l2norm_head_dim, grad_sink=None):
    """``(y, final_state, l2norm_done)`` from the kernel `_run_kernel` picks, or None."""
    x, weight, bias, activation, cu_seqlens, initial_state, output_final_state = args
    if backend == "triton" or (backend == "auto" and own_kernels.enabled()):
        if _ours_cover(x, weight, cu_seqlens, initial_state, output_final_state) and own_kernels.triton_ok():
            from .causal_conv1d_triton import causal_conv1d_triton, fuses_l2norm  # imports triton

            record("causal_conv1d", "triton")
            fuse = l2norm_head_dim is not None and fuses_l2norm(l2norm_head_dim)
            y = causal_conv1d_triton(x, weight, bias, activation, l2norm_head_dim if fuse else None, grad_sink)
            return y, None, fuse
        if backend == "triton":
            raise ValueError(
                "backend='triton' covers CUDA calls without cu_seqlens or states, width <= 4 and unit channel "
                f"stride (needs triton); got x {tuple(x.shape)} on {x.device}, width {weight.shape[1]}, "
                f"cu_seqlens={'set' if cu_seqlens is not None else None}, initial_state="
                f"{'set' if initial_state is not None else None}, output_final_state={output_final_state}"
            )
    # Dao's kernel cannot mix seq_idx (packing) with initial/final states.
    dao_ok = cu_seqlens is None or (initial_state is None and not output_final_state)
    if backend in ("auto", "causal_conv1d"):
        fn = _load_dao()
        if fn is None and backend == "causal_conv1d":
            raise ImportError(
                "backend='causal_conv1d' needs the causal-conv1d package: `pip install causal-conv1d`"
            )
        if fn is not None and dao_ok:
            record("causal_conv1d", "causal_conv1d")
            return (*_dao_conv(fn, *args), False)
        if backend == "causal_conv1d":
            raise ValueError("causal_conv1d kernels cannot combine cu_seqlens with initial/final states")
    fn = _load_fla_conv()
    if fn is not None:
        record("causal_conv1d", "fla")
        return (*_fla_conv(fn, *args), False)
    if backend == "fla":
        raise ImportError(
            "backend='fla' needs a recent fla: `pip install fla-core` or "
            "`pip install 'flash-linear-attention<0.6'`"
        )
    return None


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = "silu",
) -> torch.Tensor:
    """One decoding step: ``x [B, D]`` with left context ``conv_state [B, D, W-1]`` -> ``y [B, D]``.

    ``conv_state`` is shifted in place (drops its oldest column, appends ``x``), so that the next
    call continues the sequence; ``causal_conv1d(x[:, None], ..., initial_state=conv_state)`` gives
    the same ``y``. Plain torch on every device: three small element-wise kernels, which a CUDA
    graph of the decode step replays without launch overhead (no kernel is needed for speed).
    """
    B, D = x.shape
    W = weight.shape[1]
    if weight.shape[0] != D or conv_state.shape != (B, D, W - 1):
        raise ValueError(
            f"x [B, D] = {tuple(x.shape)}, weight [D, W] = {tuple(weight.shape)} and conv_state [B, D, W-1] "
            f"= {tuple(conv_state.shape)} do not fit together"
        )
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    window = torch.cat([conv_state.to(dtype), x.to(dtype).unsqueeze(-1)], dim=-1)  # [B, D, W]
    y = (window * weight.to(dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(dtype)
    conv_state.copy_(window[..., 1:])
    record("causal_conv1d_update", "torch")
    return (F.silu(y) if activation is not None else y).to(x.dtype)
