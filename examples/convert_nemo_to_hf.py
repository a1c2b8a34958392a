#!/usr/bin/env python3
"""Convert a NeMo 2 Qwen3-Next checkpoint into a Hugging Face directory (streamed, validated, atomic).

    python examples/convert_nemo_to_hf.py --input NEMO_DIR --output HF_DIR [--max-shard-size 5GB] [--overwrite]

Writes sharded safetensors + model.safetensors.index.json, config.json (the imported one, keys and
values as they were) and the non-weight files the checkpoint carries (tokenizer,
generation_config.json ...); the result loads with `transformers.AutoModelForCausalLM.from_pretrained`.
A bad input is refused in one line on stderr (exit code 2); nothing is left behind.
"""

import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def main(argv=None) -> int:
    from nemo_qwen3_next.checkpoint.cli import ArgumentParser, add_converter_options, console, run

    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="NeMo checkpoint directory (weights/ + context/)")
    p.add_argument("--output", required=True, help="HF directory to create")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    add_converter_options(p)
    a = p.parse_args(argv)

    from nemo_qwen3_next.checkpoint import check_nemo_dir, check_output, parse_size, remove_stale_temp_dirs

    def convert():
        parse_size(a.max_shard_size)  # cheap checks first: a wrong input answers before the ~25 s of imports
        check_nemo_dir(a.input)
        for path in remove_stale_temp_dirs(a.output):
            print(f"note: cleaned up {path}, left behind by a killed run", file=console())
        check_output(a.output, a.overwrite)
        check_nemo_dir(a.input, deep=True)  # every stored chunk inside its file: needs torch (~2 s), not NeMo
        from nemo_qwen3_next.nemo.convert import convert_nemo_to_hf

        return convert_nemo_to_hf(a.input, a.output, overwrite=a.overwrite, progress=not a.no_progress,
                                  max_shard_size=a.max_shard_size, allow_non_finite=a.allow_non_finite)

    return run("convert_nemo_to_hf.py", convert, a.debug)


if __name__ == "__main__":
    sys.exit(main())
