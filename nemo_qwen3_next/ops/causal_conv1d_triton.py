"""Our Triton causal conv (width <= 4, optional SiLU) for the training path: no states, no packing.

Why our own: fla's conv backward first re-runs the forward to store the pre-activation in bf16 and
then reads it and ``dy`` once per tap, with one sigmoid per tap; on H200 at 80B-A3B widths, B=4
T=4096, that was 0.84 ms of backward plus 0.37 ms of forwards for the three q/k/v convs, where the
bytes moved (x, dy in, dx out) take ~0.17 ms. Here each program walks ``L`` time steps of ``BD``
channels with a sliding window in registers: per step it loads one row of x and of dy, computes the
pre-activation of the newest row once (fp32, never stored), and writes one row of dx; the weight and
bias gradients are per-program partial sums, added up in one small reduction.

Layout: ``x [B, T, D]`` channels last (any row strides, unit channel stride), ``weight [D, W]``;
``y[t] = act(bias + sum_j weight[:, j] * x[t - (W-1) + j])`` with zeros before ``t = 0``, the same as
`causal_conv1d_ref`. Widths below 4 run as width 4 with leading zero taps (same result).

With ``l2norm_head_dim`` (the GDN's q and k) each group of that many channels is L2-normalised after
the SiLU (fp32, eps 1e-6, as HF's ``l2norm``): the forward writes the normalised rows and saves one rstd
per head and row (``[B, T, D/HD]`` fp32), and the backward applies the norm's backward
``(g - yn (g . yn)) rstd`` with one reduction per row. Configs whose channel block is one head are
preferred then (a plain row sum, no reshape).

Imports triton at load: `causal_conv1d` imports this module only where triton is installed.
``causal_conv1d(..., backend="triton")``, or "auto" with our kernels on (`own_kernels`), runs it on
CUDA when there is no ``cu_seqlens``, initial or final state (packed input and generation go to fla /
Dao's kernel / the reference). Tests compare it with the reference under Triton's interpreter on CPU
(`tests/test_own_kernels.py`, fp32 vs float64: 1e-5) and in bf16 on GPU against the reference and fla
(`tests/test_gpu_speed_paths.py`, the L2-norm cases included: they passed on an H100, Dec 06).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .grad_sink import sink_slot_or_empty

W_MAX = 4  # taps the kernels are written for (Qwen3-Next uses 4)
L2_EPS: tl.constexpr = tl.constexpr(1e-6)  # the q/k L2-norm's eps (HF's and fla's `l2norm`)
# (channels BD, warps, time steps L, prefetch PF, blocks NB) per program, 4 channels a thread; a program walks NB
# blocks of L steps (the window and partial sums carried: fewer halo rows re-read). PF = 4 issues the loads of
# the row 4 steps ahead before this step's math and store: without it every step waits a full memory latency
# (a load is not moved above the previous step's store, which the compiler must assume may alias it). It costs
# registers (backward 128 -> 193 at L = 32, fewer warps per SM), so it pays with L = 16: on H100 at D=2048 with
# the norm, B=4 T=4096, bwd 0.153 ms vs 0.163 (L=32, no prefetch), fwd 0.061 vs 0.073 (bench_conv.py, Dec 06).
# NB = 4 (H100, Dec 08, bench_conv.py): the backward 0.260 vs 0.285 ms at B=1 T=32768 D=2048 with the norm, 0.135 vs
# 0.152 at B=4 T=4096, the forward a little slower (0.113 vs 0.109); the autotuner picks per kernel and (D, T, HD).
# A loop count taken from the grid (programs capped per SM: fewer fp32 weight-gradient partials) was slower at the
# same launch with the norm (0.293 vs 0.260 ms) and is not kept (benchmarks/results/h200_model/dec08_h100_call1_*).
# QWEN3_NEXT_CONV_CONFIGS="BD:warps:L[:PF[:NB]],..." replaces the list.
_DEFAULT_CONFIGS = "128:1:16:4,256:2:16:4,512:4:16:4,128:1:32:0,128:1:16:4:4,256:2:16:4:4"
_PREFETCH = (0, 4)  # the prefetch depths the kernels are written for


def _configs(spec: str):
    try:
        cfgs = [tuple(int(v) for v in item.split(":")) for item in spec.split(",")]
        cfgs = [c + (0, 1)[len(c) - 3:] if 3 <= len(c) < 5 else c for c in cfgs]
        assert cfgs and all(len(c) == 5 and c[0] % 128 == 0 and c[1] > 0 and c[2] > 0 and c[3] in _PREFETCH
                            and c[4] > 0 for c in cfgs)
    except (ValueError, AssertionError):
        raise ValueError("QWEN3_NEXT_CONV_CONFIGS must be 'BD:warps:L[:PF[:NB]],...' with BD a multiple of 128, "
                         f"PF one of {_PREFETCH} and NB >= 1; got {spec!r}")
    return [triton.Config({"BD": bd, "L": rows, "PF": pf, "NB": nb}, num_warps=nw) for bd, nw, rows, pf, nb in cfgs]


_CONFIGS = _configs(os.environ.get("QWEN3_NEXT_CONV_CONFIGS", _DEFAULT_CONFIGS))
if os.environ.get("TRITON_INTERPRET") == "1":  # Triton's CPU interpreter (tests) cannot benchmark configs
    _CONFIGS = _CONFIGS[:1]
_MIN_ROWS = min(c.kwargs["L"] * c.kwargs["NB"] for c in _CONFIGS)  # rows per program, at the fewest


@triton.jit
def _channels(w, b, D, HAS_BIAS: tl.constexpr, BD: tl.constexpr):
    """This program's channels d (and their mask) with their four right-aligned fp32 taps and bias."""
    d = tl.program_id(0) * BD + tl.arange(0, BD)
    md = d < D
    w0 = tl.load(w + d * 4 + 0, mask=md, other=0.0)
    w1 = tl.load(w + d * 4 + 1, mask=md, other=0.0)
    w2 = tl.load(w + d * 4 + 2, mask=md, other=0.0)
    w3 = tl.load(w + d * 4 + 3, mask=md, other=0.0)
    bias = tl.zeros([BD], tl.float32)
    if HAS_BIAS:
        bias = tl.load(b + d, mask=md, other=0.0)
    return d, md, w0, w1, w2, w3, bias


@triton.jit
def _raw(p, t, stride, md, T):
    """Row t of a [T, channels] plane as stored; zeros outside 0 <= t < T (the causal padding, the tail).
    A prefetched row stays in this form until used: half the registers of fp32."""
    return tl.load(p + t.to(tl.int64) * stride, mask=md & (t >= 0) & (t < T), other=0.0)


@triton.jit
def _row(p, t, stride, md, T):
    """Row t in fp32 (`_raw`, converted)."""
    return _raw(p, t, stride, md, T).to(tl.float32)


@triton.jit
def _norm_rows(rs, pid_b, t, T, NH, HD: tl.constexpr, BD: tl.constexpr):
    """Pointers and mask of this program's heads in row t of the saved ``rstd [B, T, NH]`` (one head per
    program when HD == BD: a scalar)."""
    base = rs + (pid_b.to(tl.int64) * T + t) * NH
    if HD == BD:  # one return per function: Triton needs one return type
        ptr = base + tl.program_id(0)
        m = t < T
    else:
        h = tl.program_id(0) * (BD // HD) + tl.arange(0, BD // HD)
        ptr = base + h
        m = (h < NH) & (t < T)
    return ptr, m


@triton.jit
def _act(p, SILU: tl.constexpr, HD: tl.constexpr, BD: tl.constexpr):
    """The output row from the pre-activation p and its per-head rstd: SiLU, then (HD > 0) each group of HD
    channels L2-normalised (rstd is 1 without the norm). HD == BD sums the whole row, no reshape."""
    y = p
    if SILU:
        y = p * tl.sigmoid(p)
    r = 1.0
    if HD == BD:
        r = tl.rsqrt(tl.sum(y * y, axis=0) + L2_EPS)
        y = y * r
    elif HD > 0:
        y2 = tl.reshape(y, [BD // HD, HD])
        r = tl.rsqrt(tl.sum(y2 * y2, axis=1) + L2_EPS)
        y = tl.reshape(y2 * r[:, None], [BD])
    return y, r


@triton.jit
def _grad_pre(g, p, r, SILU: tl.constexpr, HD: tl.constexpr, BD: tl.constexpr):
    """dL/dp from g = dL/d(output row), the pre-activation p and the forward's rstd r (the inverse of `_act`,
    in fp32): the L2-norm's backward is ``(g - yn (g . yn)) r`` per head, one reduction."""
    s = p
    y = p
    if SILU:
        s = tl.sigmoid(p)
        y = p * s
    if HD == BD:
        yn = y * r
        g = (g - yn * tl.sum(g * yn, axis=0)) * r
    elif HD > 0:
        y2 = tl.reshape(y, [BD // HD, HD])
        g2 = tl.reshape(g, [BD // HD, HD])
        yn = y2 * r[:, None]
        g = tl.reshape((g2 - yn * tl.sum(g2 * yn, axis=1)[:, None]) * r[:, None], [BD])
    if SILU:
        g = g * s * (1 + p * (1 - s))
    return g


@triton.jit
def _rstd(rs, pid_b, t, T, NH, HD: tl.constexpr, BD: tl.constexpr):
    """The forward's rstd of row t (this program's heads; 1.0 without the norm)."""
    r = 1.0
    if HD > 0:
        ptr, m = _norm_rows(rs, pid_b, t, T, NH, HD, BD)
        r = tl.load(ptr, mask=m, other=0.0)
    return r


def _prune(configs, named_args, **kwargs):
    """With the L2-norm, keep the configs whose channel block is one head (the reduction needs no reshape)."""
    hd = kwargs.get("HD", 0)
    one_head = [c for c in configs if c.kwargs["BD"] == hd]
    return one_head if hd and one_head else configs


@triton.autotune(configs=_CONFIGS, key=["D", "T", "HD"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _conv_fwd(x, w, b, y, rs, T, D, NH, sxb, sxt, syb, syt,
         L: tl.constexpr, BD: tl.constexpr, PF: tl.constexpr, NB: tl.constexpr, HAS_BIAS: tl.constexpr,
         SILU: tl.constexpr, HD: tl.constexpr):
    pid_t, pid_b = tl.program_id(1), tl.program_id(2)
    d, md, w0, w1, w2, w3, bias = _channels(w, b, D, HAS_BIAS, BD)
    xb = x + pid_b.to(tl.int64) * sxb + d
    yb = y + pid_b.to(tl.int64) * syb + d
    t0 = pid_t * (L * NB)
    xm3, xm2, xm1 = _row(xb, t0 - 3, sxt, md, T), _row(xb, t0 - 2, sxt, md, T), _row(xb, t0 - 1, sxt, md, T)
    if PF:  # rows t0 .. t0+3 in flight (see _DEFAULT_CONFIGS)
        n0, n1 = _raw(xb, t0, sxt, md, T), _raw(xb, t0 + 1, sxt, md, T)
        n2, n3 = _raw(xb, t0 + 2, sxt, md, T), _raw(xb, t0 + 3, sxt, md, T)
    for blk in range(NB):  # NB blocks of L rows: the window carries over (no halo rows re-read)
        for i in tl.static_range(L):  # unrolled: the compiler can issue later rows' loads early
            t = t0 + blk * L + i
            if PF:
                x0 = n0.to(tl.float32)
                n0, n1, n2, n3 = n1, n2, n3, _raw(xb, t + 4, sxt, md, T)
            else:
                x0 = _row(xb, t, sxt, md, T)
            acc, r = _act(bias + w0 * xm3 + w1 * xm2 + w2 * xm1 + w3 * x0, SILU, HD, BD)
            tl.store(yb + t.to(tl.int64) * syt, acc.to(y.dtype.element_ty), mask=md & (t < T))
            if HD > 0:  # the backward reuses it: one reduction per row there instead of two
                ptr, m = _norm_rows(rs, pid_b, t, T, NH, HD, BD)
                tl.store(ptr, r, mask=m)
            xm3, xm2, xm1 = xm2, xm1, x0


@triton.autotune(configs=_CONFIGS, key=["D", "T", "HD"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _conv_bwd(x, w, b, rs, dy, dx, dwp, dbp, T, D, NH, sxb, sxt, sgb, sgt, sdb, sdt,
         L: tl.constexpr, BD: tl.constexpr, PF: tl.constexpr, NB: tl.constexpr, HAS_BIAS: tl.constexpr,
         SILU: tl.constexpr, HD: tl.constexpr):
    pid_t, pid_b = tl.program_id(1), tl.program_id(2)
    d, md, w0, w1, w2, w3, bias = _channels(w, b, D, HAS_BIAS, BD)
    xb = x + pid_b.to(tl.int64) * sxb + d
    gb = dy + pid_b.to(tl.int64) * sgb + d
    ob = dx + pid_b.to(tl.int64) * sdb + d
    t0 = pid_t * (L * NB)
    # the window: x at t-3 .. t+2 and g = dL/d(pre-activation) at t .. t+2 (zero past T: dy masked)
    xm3, xm2, xm1 = _row(xb, t0 - 3, sxt, md, T), _row(xb, t0 - 2, sxt, md, T), _row(xb, t0 - 1, sxt, md, T)
    x0, xp1, xp2 = _row(xb, t0, sxt, md, T), _row(xb, t0 + 1, sxt, md, T), _row(xb, t0 + 2, sxt, md, T)
    g0, g1, g2 = _row(gb, t0, sgt, md, T), _row(gb, t0 + 1, sgt, md, T), _row(gb, t0 + 2, sgt, md, T)
    if SILU or HD > 0:
        g0 = _grad_pre(g0, bias + w0 * xm3 + w1 * xm2 + w2 * xm1 + w3 * x0, _rstd(rs, pid_b, t0, T, NH, HD, BD),
                       SILU, HD, BD)
        g1 = _grad_pre(g1, bias + w0 * xm2 + w1 * xm1 + w2 * x0 + w3 * xp1, _rstd(rs, pid_b, t0 + 1, T, NH, HD, BD),
                       SILU, HD, BD)
        g2 = _grad_pre(g2, bias + w0 * xm1 + w1 * x0 + w2 * xp1 + w3 * xp2, _rstd(rs, pid_b, t0 + 2, T, NH, HD, BD),
                       SILU, HD, BD)
    dw0 = tl.zeros([BD], tl.float32)
    dw1 = tl.zeros([BD], tl.float32)
    dw2 = tl.zeros([BD], tl.float32)
    dw3 = tl.zeros([BD], tl.float32)
    db = tl.zeros([BD], tl.float32)
    if PF:  # x, dy and rstd of rows t0+3 .. t0+6 in flight (see _DEFAULT_CONFIGS)
        nx0, nx1 = _raw(xb, t0 + 3, sxt, md, T), _raw(xb, t0 + 4, sxt, md, T)
        nx2, nx3 = _raw(xb, t0 + 5, sxt, md, T), _raw(xb, t0 + 6, sxt, md, T)
        ng0, ng1 = _raw(gb, t0 + 3, sgt, md, T), _raw(gb, t0 + 4, sgt, md, T)
        ng2, ng3 = _raw(gb, t0 + 5, sgt, md, T), _raw(gb, t0 + 6, sgt, md, T)
        nr0, nr1 = _rstd(rs, pid_b, t0 + 3, T, NH, HD, BD), _rstd(rs, pid_b, t0 + 4, T, NH, HD, BD)
        nr2, nr3 = _rstd(rs, pid_b, t0 + 5, T, NH, HD, BD), _rstd(rs, pid_b, t0 + 6, T, NH, HD, BD)
    for blk in range(NB):  # NB blocks of L rows: the window and the partial sums carry over
        for i in tl.static_range(L):  # unrolled: the compiler can issue later rows' loads early
            t = t0 + blk * L + i
            if PF:
                xp3, g3, r3 = nx0.to(tl.float32), ng0.to(tl.float32), nr0
                nx0, nx1, nx2, nx3 = nx1, nx2, nx3, _raw(xb, t + 7, sxt, md, T)
                ng0, ng1, ng2, ng3 = ng1, ng2, ng3, _raw(gb, t + 7, sgt, md, T)
                nr0, nr1, nr2, nr3 = nr1, nr2, nr3, _rstd(rs, pid_b, t + 7, T, NH, HD, BD)
            else:
                xp3, g3, r3 = _row(xb, t + 3, sxt, md, T), _row(gb, t + 3, sgt, md, T), _rstd(rs, pid_b, t + 3, T, NH, HD, BD)
            if SILU or HD > 0:
                g3 = _grad_pre(g3, bias + w0 * x0 + w1 * xp1 + w2 * xp2 + w3 * xp3, r3, SILU, HD, BD)
            # y[t + 3 - j] reads x[t] through tap j
            gx = w3 * g0 + w2 * g1 + w1 * g2 + w0 * g3
            tl.store(ob + t.to(tl.int64) * sdt, gx.to(dx.dtype.element_ty), mask=md & (t < T))
            dw0 += g0 * xm3
            dw1 += g0 * xm2
            dw2 += g0 * xm1
            dw3 += g0 * x0
            db += g0
            xm3, xm2, xm1, x0, xp1, xp2 = xm2, xm1, x0, xp1, xp2, xp3
            g0, g1, g2 = g1, g2, g3
    row = (pid_b * tl.num_programs(1) + pid_t).to(tl.int64)
    tl.store(dwp + row * 4 * D + 0 * D + d, dw0, mask=md)
    tl.store(dwp + row * 4 * D + 1 * D + d, dw1, mask=md)
    tl.store(dwp + row * 4 * D + 2 * D + d, dw2, mask=md)
    tl.store(dwp + row * 4 * D + 3 * D + d, dw3, mask=md)
    if HAS_BIAS:
        tl.store(dbp + row * D + d, db, mask=md)


def _padded_weight(weight: torch.Tensor) -> torch.Tensor:
    """``[D, W]`` -> fp32 ``[D, 4]`` with the taps right-aligned (leading zeros for W < 4)."""
    D, W = weight.shape
    w = weight.detach().float()
    return w.contiguous() if W == W_MAX else torch.nn.functional.pad(w, (W_MAX - W, 0)).contiguous()


def _t_programs(T, meta) -> int:
    """Programs along time for a config: one per ``L * NB`` rows (each writes one row of weight-gradient partials)."""
    return -(-T // (meta["L"] * meta["NB"]))


def _grid(B, T, D):
    return lambda meta: (-(-D // meta["BD"]), _t_programs(T, meta), B)


class _CausalConv1dTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu: bool, head_dim: int = 0, grad_sink=None):
        B, T, D = x.shape
        if head_dim and (D % head_dim or not fuses_l2norm(head_dim)):
            raise ValueError(f"l2norm_head_dim={head_dim} must divide D={D} and every program's channel block "
                             f"({', '.join(str(c.kwargs['BD']) for c in _CONFIGS)})")
        wp = _padded_weight(weight)
        bp = bias.detach().float().contiguous() if bias is not None else wp  # dummy pointer when absent
        y = torch.empty(B, T, D, device=x.device, dtype=x.dtype)
        nh = D // head_dim if head_dim else 0
        rs = torch.empty(B, T, nh, device=x.device, dtype=torch.float32) if head_dim else wp  # per-head rstd
        _conv_fwd[_grid(B, T, D)](x, wp, bp, y, rs, T, D, nh, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                             HAS_BIAS=bias is not None, SILU=silu, HD=head_dim)
        # the kernels' fp32 taps and bias, and the norm's rstd (B*T*D/HD floats)
        ctx.save_for_backward(x, wp, bp if bias is not None else None, rs if head_dim else None)
        ctx.silu, ctx.head_dim, ctx.w_shape, ctx.w_dtype = silu, head_dim, weight.shape, weight.dtype
        ctx.b_dtype = bias.dtype if bias is not None else None
        ctx.grad_sink = grad_sink
        return y

    @staticmethod
    def backward(ctx, dy):
        x, wp, bp, rs = ctx.saved_tensors
        has_bias = bp is not None
        bp = bp if has_bias else wp  # dummy pointer when absent
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        B, T, D = x.shape
        W = ctx.w_shape[1]
        rows = B * (-(-T // _MIN_ROWS))  # partial-sum rows for the config with the fewest steps per program
        # x's layout (a [b, s] view of [s, b] memory stays one, so no copy follows), or x's place in the sink
        # of the GEMM output x is a view of (`grad_sink`: no gradient cat after us)
        dx = sink_slot_or_empty(ctx.grad_sink, x)
        dwp = torch.empty(rows, W_MAX, D, device=x.device, dtype=torch.float32)
        dbp = torch.empty(rows, D, device=x.device, dtype=torch.float32) if has_bias else dwp
        nh = D // ctx.head_dim if ctx.head_dim else 0
        _conv_bwd[_grid(B, T, D)](x, wp, bp, rs if rs is not None else wp, dy, dx, dwp, dbp, T, D, nh,
                             x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
                             dx.stride(0), dx.stride(1), HAS_BIAS=has_bias, SILU=ctx.silu, HD=ctx.head_dim)
        best = _conv_bwd.best_config.kwargs
        rows = B * _t_programs(T, best)  # the rows the chosen config wrote
        dwp, dbp = dwp[:rows], dbp[:rows]
        dw = dwp.sum(0).t()[:, W_MAX - W:].to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        db = dbp.sum(0).to(ctx.b_dtype) if has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None


def fuses_l2norm(head_dim: int) -> bool:
    """Whether the kernels can L2-normalise groups of ``head_dim`` channels (each group inside one program)."""
    return head_dim > 0 and all(c.kwargs["BD"] % head_dim == 0 for c in _CONFIGS)


def causal_conv1d_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         activation: Optional[str] = "silu", l2norm_head_dim: Optional[int] = None,
                         grad_sink=None) -> torch.Tensor:
    """``y [B, T, D]`` (x's dtype, fp32 math) of the causal depthwise conv; see the module docstring.
    ``l2norm_head_dim``: L2-normalise each group of that many channels after the activation (`fuses_l2norm`).
    ``grad_sink``: a `grad_sink.GradSink` whose base x is a view of; dx is written into x's place there."""
    return _CausalConv1dTriton.apply(x, weight, bias, activation in ("silu", "swish"), l2norm_head_dim or 0,
                                     grad_sink)
