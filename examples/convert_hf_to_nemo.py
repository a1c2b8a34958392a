#!/usr/bin/env python3
"""Convert a Hugging Face Qwen3-Next directory into a NeMo 2 checkpoint (streamed, validated, atomic).

    python examples/convert_hf_to_nemo.py --input HF_DIR --output NEMO_DIR [--dtype bf16|fp32] [--overwrite]

The result (`NEMO_DIR/weights` = Megatron distributed checkpoint, `NEMO_DIR/context`) loads at any
TP/PP/EP. A bad input is refused in one line on stderr (exit code 2) before NeMo is imported;
nothing is left behind. See docs/conversion.md.
"""

import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def main(argv=None) -> int:
    from nemo_qwen3_next.checkpoint.cli import ArgumentParser, add_converter_options, console, run

    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="HF directory: config.json + *.safetensors (+ tokenizer files)")
    p.add_argument("--output", required=True, help="NeMo checkpoint directory to create")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="parameter dtype (default: the checkpoint's torch_dtype)")
    add_converter_options(p)
    a = p.parse_args(argv)

    from nemo_qwen3_next.checkpoint import check_hf_dir, check_output, remove_stale_temp_dirs

    def convert():
        check_hf_dir(a.input)  # cheap checks first: a wrong input answers before the ~25 s of imports
        for path in remove_stale_temp_dirs(a.output):
            print(f"note: cleaned up {path}, left behind by a killed run", file=console())
        check_output(a.output, a.overwrite)
        from nemo_qwen3_next.nemo.convert import convert_hf_to_nemo

        return convert_hf_to_nemo(a.input, a.output, dtype=a.dtype, overwrite=a.overwrite,
                                  progress=not a.no_progress, allow_non_finite=a.allow_non_finite)

    return run("convert_hf_to_nemo.py", convert, a.debug)


if __name__ == "__main__":
    sys.exit(main())
