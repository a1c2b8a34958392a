"""The GDN's in_proj as five GEMMs on planar weight pieces (q, k, v, z, [b | a]) against one GEMM on the
whole planar weight, forward, input gradient and weight gradient, at 80B-A3B widths (GPU only).

Decides whether the fused path should run in_proj as one GEMM whose output the pieces view (and whose
input gradient the pieces' backward kernels write into one buffer): prints ms per direction and TFLOP/s.

    python3 benchmarks/bench_in_proj.py --tokens 16384,32768 --out in_proj.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="16384,32768", help="N (= B*T),...")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--pieces", default="2048,2048,4096,4096,64", help="output columns per piece")
    ap.add_argument("--out", default=None, help="JSON results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_in_proj.py needs a CUDA GPU")
    from profile_gdn import load_benchmark  # this folder is on sys.path when run as a script

    time_ms = load_benchmark().time_ms  # median of CUDA-event times, as examples/benchmark.py times

    def _t(fn):
        return time_ms(fn, warmup=5, rep=20)

    H, sizes = args.hidden, [int(v) for v in args.pieces.split(",")]
    C = sum(sizes)
    rows = []
    for N in (int(v) for v in args.tokens.split(",")):
        x = torch.randn(N, H, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(C, H, device="cuda", dtype=torch.bfloat16) * 0.02
        ws = [p.contiguous() for p in torch.split(w, sizes, 0)]
        g = torch.randn(N, C, device="cuda", dtype=torch.bfloat16)
        gs = [p.contiguous() for p in torch.split(g, sizes, 1)]

        def dgrad_pieces():
            gx = gs[0] @ ws[0]
            for gi, wi in zip(gs[1:], ws[1:]):
                gx.addmm_(gi, wi)
            return gx

        res = {
            "N": N, "H": H, "pieces": sizes,
            "fwd_pieces_ms": _t(lambda: [x @ wi.t() for wi in ws]),
            "fwd_one_ms": _t(lambda: x @ w.t()),
            "dgrad_pieces_ms": _t(dgrad_pieces),
            "dgrad_one_ms": _t(lambda: g @ w),
            "wgrad_pieces_ms": _t(lambda: [gi.t() @ x for gi in gs]),
            "wgrad_one_ms": _t(lambda: g.t() @ x),
            "cat_grads_ms": _t(lambda: torch.cat(gs, 1)),
        }
        flop = 2.0 * N * H * C
        for k in list(res):
            if k.endswith("_ms") and not k.startswith("cat"):
                res[k.replace("_ms", "_tflops")] = round(flop / res[k] * 1e-9, 1)
        res["pieces_total_ms"] = res["fwd_pieces_ms"] + res["dgrad_pieces_ms"] + res["wgrad_pieces_ms"]
        res["one_total_ms"] = res["fwd_one_ms"] + res["dgrad_one_ms"] + res["wgrad_one_ms"]
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}))
        rows.append(res)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
