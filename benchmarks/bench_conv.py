"""Our Triton causal conv per launch config, against the bytes it must move (GPU only).

For the GDN's three convs at 80B-A3B widths (q and k: D=2048 with the per-head L2-norm fused, v: D=4096),
each input a ``[b, s, D]`` view of sequence-first memory as the planar path hands it over, this times the
forward and the backward kernel (with its weight-gradient reduction) of every ``BD:warps:L[:PF[:NB]]`` config given,
prints ms and GB/s (x read + y written; x, dy read + dx and the partial sums written), and writes JSON.
The autotuned list in `ops/causal_conv1d_triton.py` (``QWEN3_NEXT_CONV_CONFIGS``) is chosen from this.
Also timed: fla's conv followed by FlashQLA's compiled L2-norm (the path before the fused norm), where
importable.

    python3 benchmarks/bench_conv.py --shapes 4x4096,1x32768 --configs 128:1:32:0,128:1:32:4,256:2:32:4 --out conv.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="4x4096,1x32768,1x4096", help="BxT,...")
    ap.add_argument("--configs", default="128:1:32:0,128:1:32:4,256:2:32:0,256:2:32:4,512:4:32:4,128:2:32:4,"
                    "128:1:64:4,128:1:16:4,128:1:16:4:4", help="BD:warps:L[:PF[:NB]],... (PF: prefetch depth, 0 or 4; "
                    "NB: blocks of L rows per program, 1 by default)")
    ap.add_argument("--out", default=None, help="JSON results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_conv.py needs a CUDA GPU")
    import triton
    from triton.testing import do_bench

    from nemo_qwen3_next.ops import causal_conv1d_triton as ct

    configs = [(c.kwargs["BD"], c.num_warps, c.kwargs["L"], c.kwargs["PF"], c.kwargs["NB"]) for c in ct._configs(args.configs)]
    rows_out = []
    for shape in args.shapes.split(","):
        B, T = (int(v) for v in shape.split("x"))
        for D, hd in ((2048, 128), (4096, 0)):
            torch.manual_seed(0)
            xs = torch.randn(T, B, D, device="cuda", dtype=torch.bfloat16)
            x = xs.transpose(0, 1)  # [b, s, D] view of [s, b, D] memory
            w = torch.randn(D, 4, device="cuda", dtype=torch.float32) * 0.5
            dy = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(B, T, D, device="cuda", dtype=torch.bfloat16)
            dx = torch.empty_like(x)
            act = B * T * D * 2  # bytes of one activation
            nh = D // hd if hd else 0
            rs = torch.empty(B, T, max(nh, 1), device="cuda", dtype=torch.float32)  # the norm's saved rstd
            for bd, nw, L, pf, nb in configs:
                if hd and bd % hd:  # a head must fit in one program's channel block
                    continue
                nt = ct._t_programs(T, dict(L=L, NB=nb))
                grid, nrows = (triton.cdiv(D, bd), nt, B), B * nt
                dwp = torch.empty(nrows, 4, D, device="cuda", dtype=torch.float32)

                def fwd():
                    ct._conv_fwd.fn[grid](x, w, w, y, rs, T, D, nh, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                                     L=L, BD=bd, PF=pf, NB=nb, HAS_BIAS=False, SILU=True, HD=hd, num_warps=nw)

                def bwd():
                    ct._conv_bwd.fn[grid](x, w, w, rs, dy, dx, dwp, dwp, T, D, nh, x.stride(0), x.stride(1), dy.stride(0),
                                     dy.stride(1), dx.stride(0), dx.stride(1), L=L, BD=bd, PF=pf, NB=nb, HAS_BIAS=False, SILU=True,
                                     HD=hd, num_warps=nw)
                    dwp.sum(0)

                tf, tb = do_bench(fwd, warmup=25, rep=200), do_bench(bwd, warmup=25, rep=200)
                gb_f, gb_b = 2 * act / tf / 1e6, (3 * act + nrows * 4 * D * 4 * 2) / tb / 1e6
                row = dict(B=B, T=T, D=D, l2norm_head_dim=hd, config=f"{bd}:{nw}:{L}:{pf}:{nb}", fwd_ms=tf, bwd_ms=tb,
                           fwd_GBps=gb_f, bwd_GBps=gb_b)
                rows_out.append(row)
                print(f"B={B} T={T:6d} D={D} hd={hd:3d} {bd:4d}:{nw}:{L:<3d}:{pf}:{nb} fwd {tf:.4f} ms {gb_f:6.0f} GB/s  "
                      f"bwd {tb:.4f} ms {gb_b:6.0f} GB/s", flush=True)
            rows_out.extend(vendor(B, T, D, hd, x, dy, do_bench))
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           command=" ".join(sys.argv), rows=rows_out), f, indent=1)
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")


def vendor(B, T, D, hd, x, dy, do_bench):
    """fla's conv (fwd, then fwd+bwd through autograd) with FlashQLA's compiled L2-norm where hd > 0."""
    try:
        from fla.modules.convolution import causal_conv1d
        l2 = None
        if hd:
            from flash_qla.utils.math import l2norm_bwd, l2norm_fwd
            l2 = (l2norm_fwd, l2norm_bwd)
    except Exception as e:  # not installed here
        print(f"vendor conv skipped: {e!r}")
        return []
    w = (torch.randn(D, 4, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_()
    xi = x.detach().contiguous().requires_grad_()

    def fwd():
        with torch.no_grad():
            y, _ = causal_conv1d(x=xi, weight=w, activation="silu")
            if l2:
                y, _ = l2[0](y.view(B, T, D // hd, hd))
        return y

    def fwdbwd():
        y, _ = causal_conv1d(x=xi, weight=w, activation="silu")
        g = dy
        if l2:
            yn, rstd = l2[0](y.detach().view(B, T, D // hd, hd))
            g = l2[1](yn, rstd, dy.view(B, T, D // hd, hd)).to(y.dtype).view(B, T, D)
        y.backward(g)

    tf, tfb = do_bench(fwd, warmup=25, rep=200), do_bench(fwdbwd, warmup=25, rep=200)
    print(f"B={B} T={T:6d} D={D} hd={hd:3d} fla+l2norm fwd {tf:.4f} ms, fwd+bwd {tfb:.4f} ms", flush=True)
    return [dict(B=B, T=T, D=D, l2norm_head_dim=hd, config="fla" + ("+flash_qla_l2norm" if hd else ""),
                 fwd_ms=tf, fwdbwd_ms=tfb)]


if __name__ == "__main__":
    main()
