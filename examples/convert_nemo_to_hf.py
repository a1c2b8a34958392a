#!/usr/bin/env python3
"""Convert a NeMo 2 Qwen3-Next checkpoint into a Hugging Face directory (streamed, atomic).

    python examples/convert_nemo_to_hf.py --input NEMO_DIR --output HF_DIR [--max-shard-size 5GB] [--overwrite]

Writes sharded safetensors + model.safetensors.index.json, config.json and the tokenizer files
the checkpoint carries; the result loads with `transformers.AutoModelForCausalLM.from_pretrained`.
"""

import argparse
import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="NeMo checkpoint directory (weights/ + context/)")
    p.add_argument("--output", required=True, help="HF directory to create")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    from nemo_qwen3_next.nemo.convert import ConversionError, convert_nemo_to_hf

    try:
        report = convert_nemo_to_hf(a.input, a.output, overwrite=a.overwrite, progress=not a.no_progress,
                                    max_shard_size=a.max_shard_size)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
