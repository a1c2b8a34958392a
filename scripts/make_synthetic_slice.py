#!/usr/bin/env python3
"""Write a synthetic Qwen3-Next-80B-A3B *slice*: real widths, few layers, random bf16 weights.

    python scripts/make_synthetic_slice.py --output /tmp/q3n_slice [--layers 2] [--num-experts 512]

Default: 2 layers (one Gated DeltaNet, one gated attention), both MoE with all 512 experts, the
full 151936-token embedding and lm_head: ~7.7 GB in bf16, HF layout (5 GB safetensors shards +
index + config.json), for measuring conversion throughput and peak memory (docs/conversion.md).
Tensors are generated and written one at a time (the script itself needs ~1 tensor of memory).
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True)
    p.add_argument("--layers", type=int, default=2, help="layers; types alternate linear, full, linear, full ...")
    p.add_argument("--num-experts", type=int, default=512)
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    import torch

    from nemo_qwen3_next import qwen3_next_80b_a3b
    from nemo_qwen3_next.hf_mapping import weight_plan
    from nemo_qwen3_next.nemo.convert import _shard_layout, meta_model, parse_size
    from nemo_qwen3_next.checkpoint import SafetensorsStreamWriter

    layer_types = ["linear_attention" if i % 2 == 0 else "full_attention" for i in range(a.layers)]
    cfg = qwen3_next_80b_a3b(num_layers=a.layers, layer_types=layer_types, num_moe_experts=a.num_experts,
                             moe_router_topk=min(10, a.num_experts), use_cpu_initialization=True,
                             perform_initialization=False)
    params = dict(meta_model(cfg).state_dict())
    entries = []
    for e in weight_plan(cfg):
        for n, t in zip(e.hf, e.to_hf(params[e.ours])):
            entries.append((n, torch.bfloat16, tuple(t.shape)))
    os.makedirs(a.output, exist_ok=True)
    shards = _shard_layout(entries, parse_size(a.max_shard_size))
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    gen = torch.Generator().manual_seed(a.seed)
    total, t0 = 0, time.perf_counter()
    for fn, shard in zip(files, shards):
        w = SafetensorsStreamWriter(os.path.join(a.output, fn), shard)
        for name, dtype, shape in shard:
            if "norm" in name:
                t = 0.1 * torch.randn(shape, generator=gen)
            elif name.endswith("A_log"):
                t = torch.rand(shape, generator=gen) * 2.7
            elif name.endswith("dt_bias"):
                t = torch.ones(shape)
            else:
                t = torch.empty(shape, dtype=dtype).uniform_(-0.03, 0.03, generator=gen)
            w.write(name, t.to(dtype))
            total += t.numel() * 2
        w.close()
    if len(files) > 1:
        with open(os.path.join(a.output, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total},
                       "weight_map": {n: files[i] for i, s in enumerate(shards) for n, _, _ in s}}, f, indent=2)
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = "bfloat16"
    with open(os.path.join(a.output, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    largest = max(entries, key=lambda x: torch.Size(x[2]).numel())
    print(f"wrote {a.output}: {len(entries)} tensors, {total / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s; "
          f"largest tensor {largest[0]} {largest[2]} = {torch.Size(largest[2]).numel() * 2 / 1e9:.3f} GB")


if __name__ == "__main__":
    sys.exit(main())
