"""Our Triton gated RMSNorm, ``y = x̂ · w · silu(z)`` per row of the last dim, on any row strides.

Why our own: fla's fused kernel flattens its inputs to rows, so x, z and y must share one row layout.
The GDN's sequence-first path (`GatedDeltaNet._forward_fused` with our kernels) has the chunk rule's
output ``o`` batch-first ``[b, s, Hv, Dv]`` but z (from in_proj) and the output (for out_proj)
sequence-first: this kernel reads and writes each in its own layout, which saves the two batch-first
transposes of the layer's input and output, forward and backward (4 x 64 MB at B=4 T=4096, 80B-A3B).

Tensors are ``[B, S, H, D]`` with unit stride in D (any strides over B, S, H; each tensor's own);
``y`` and ``dz`` take z's dim order (also where z is a strided column view: ``y`` then is dense in that
order, ``dz`` goes into z's place in a `grad_sink.GradSink` when one is given), ``dx`` takes x's
(`torch.empty_like`: a dense permuted layout is kept, anything else becomes contiguous). Math in fp32 (x̂ is not rounded to the input dtype,
as fla's kernel; the reference `gated_rms_norm_ref` rounds it, HF's casts). ``rstd`` per row is
saved for the backward; the gain's gradient is a per-program partial sum, reduced in torch.
Imports triton at load: `gated_rms_norm` imports this module only where triton is installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grad_sink import sink_slot_or_empty

_ROWS = 16  # rows per program


@triton.jit
def _tile(p, rb, rs_, rh, sb, ss, sh, d):
    """The pointers of rows (b, s, h) x channels d of a [B, S, H, D] tensor with strides (sb, ss, sh, 1)."""
    return p + (rb * sb + rs_ * ss + rh * sh)[:, None] + d[None, :]


@triton.jit
def _rows(N, S, H, D, BR: tl.constexpr, BD: tl.constexpr):
    """This program's rows r = ((b * S) + s) * H + h as (b, s, h) in int64, the channels, and the masks."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    d = tl.arange(0, BD)
    mr = r < N
    m = mr[:, None] & (d < D)[None, :]
    return r, (r // (S * H)).to(tl.int64), ((r // H) % S).to(tl.int64), (r % H).to(tl.int64), d, mr, m


@triton.jit
def _gnorm_fwd(x, z, w, y, rstd, N, S, H, D, eps, sxb, sxs, sxh, szb, szs, szh, syb, sys, syh,
         BR: tl.constexpr, BD: tl.constexpr):
    r, rb, rs_, rh, d, mr, m = _rows(N, S, H, D, BR, BD)
    bx = tl.load(_tile(x, rb, rs_, rh, sxb, sxs, sxh, d), mask=m, other=0.0).to(tl.float32)
    bz = tl.load(_tile(z, rb, rs_, rh, szb, szs, szh, d), mask=m, other=0.0).to(tl.float32)
    bw = tl.load(w + d, mask=d < D, other=0.0).to(tl.float32)
    rs = 1.0 / tl.sqrt(tl.sum(bx * bx, 1) / D + eps)
    out = bx * rs[:, None] * bw[None, :] * (bz * tl.sigmoid(bz))
    tl.store(_tile(y, rb, rs_, rh, syb, sys, syh, d), out.to(y.dtype.element_ty), mask=m)
    tl.store(rstd + r, rs, mask=mr)


@triton.jit
def _gnorm_bwd(x, z, w, dy, rstd, dx, dz, dwp, N, S, H, D, sxb, sxs, sxh, szb, szs, szh, sgb, sgs, sgh,
         sdxb, sdxs, sdxh, sdzb, sdzs, sdzh, BR: tl.constexpr, BD: tl.constexpr):
    r, rb, rs_, rh, d, mr, m = _rows(N, S, H, D, BR, BD)
    bx = tl.load(_tile(x, rb, rs_, rh, sxb, sxs, sxh, d), mask=m, other=0.0).to(tl.float32)
    bz = tl.load(_tile(z, rb, rs_, rh, szb, szs, szh, d), mask=m, other=0.0).to(tl.float32)
    bg = tl.load(_tile(dy, rb, rs_, rh, sgb, sgs, sgh, d), mask=m, other=0.0).to(tl.float32)
    bw = tl.load(w + d, mask=d < D, other=0.0).to(tl.float32)
    rs = tl.load(rstd + r, mask=mr, other=0.0)
    xhat = bx * rs[:, None]
    sg = tl.sigmoid(bz)
    silu = bz * sg
    gz = bg * xhat * bw[None, :] * sg * (1 + bz * (1 - sg))
    gxh = bg * bw[None, :] * silu
    c = tl.sum(gxh * xhat, 1) / D
    gx = rs[:, None] * (gxh - xhat * c[:, None])
    tl.store(_tile(dx, rb, rs_, rh, sdxb, sdxs, sdxh, d), gx.to(dx.dtype.element_ty), mask=m)
    tl.store(_tile(dz, rb, rs_, rh, sdzb, sdzs, sdzh, d), gz.to(dz.dtype.element_ty), mask=m)
    tl.store(dwp + tl.program_id(0).to(tl.int64) * D + d, tl.sum(bg * xhat * silu, 0), mask=d < D)


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _empty_in_order(t, dtype):
    """A new dense tensor of ``t``'s shape whose dims are laid out in ``t``'s stride order: z's layout also where z
    is a strided view (a column slice of in_proj's output), which ``torch.empty_like`` would make contiguous."""
    order = sorted(range(t.dim()), key=lambda i: (-t.stride(i), i))
    phys = torch.empty([t.shape[i] for i in order], device=t.device, dtype=dtype)
    return phys.permute([order.index(i) for i in range(t.dim())])


class _GatedRMSNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, z, w, eps, z_grad_sink=None):
        B, S, H, D = x.shape
        N = B * S * H
        y = _empty_in_order(z, x.dtype)  # z's layout (for the sequence-first path: [s, b] memory, as out_proj takes it)
        rstd = torch.empty(N, device=x.device, dtype=torch.float32)
        grid = (triton.cdiv(N, _ROWS),)
        _gnorm_fwd[grid](x, z, w, y, rstd, N, S, H, D, eps, *_strides(x), *_strides(z), *_strides(y),
                  BR=_ROWS, BD=triton.next_power_of_2(D), num_warps=4)
        ctx.save_for_backward(x, z, w, rstd)
        ctx.z_grad_sink = z_grad_sink
        return y

    @staticmethod
    def backward(ctx, dy):
        x, z, w, rstd = ctx.saved_tensors
        B, S, H, D = x.shape
        N = B * S * H
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        # each in its input's layout (when dense); dz in z's place in the sink of the GEMM output z is a view of
        dx, dz = torch.empty_like(x), sink_slot_or_empty(ctx.z_grad_sink, z)
        grid = (triton.cdiv(N, _ROWS),)
        dwp = torch.empty(grid[0], D, device=x.device, dtype=torch.float32)
        _gnorm_bwd[grid](x, z, w, dy, rstd, dx, dz, dwp, N, S, H, D, *_strides(x), *_strides(z), *_strides(dy),
                  *_strides(dx), *_strides(dz), BR=_ROWS, BD=triton.next_power_of_2(D), num_warps=4)
        return dx, dz, dwp.sum(0).to(w.dtype), None, None


def gated_rms_norm_triton(x: torch.Tensor, z: torch.Tensor, w: torch.Tensor, eps: float,
                          z_grad_sink=None) -> torch.Tensor:
    """``[B, S, H, D]`` gated RMSNorm; the result in x's dtype, laid out like z (see the module docstring).
    ``z_grad_sink``: a `grad_sink.GradSink` whose base z is a view of; dz is written into z's place there."""
    return _GatedRMSNormTriton.apply(x, z, w, eps, z_grad_sink)
