"""Generate text from a Qwen3-Next checkpoint, streamed to stdout; speeds on stderr at the end.

    python examples/generate.py --checkpoint runs/qwen3_next_tiny --prompt "def main("     # a pretrain run
    python examples/generate.py --checkpoint HF_DIR --prompt "The capital of France is" --max-new-tokens 32
    python examples/generate.py --checkpoint NEMO_DIR --prompt "..." --temperature 0.8 --top-p 0.95 --seed 0

``--checkpoint`` takes a Hugging Face directory, a NeMo 2 checkpoint, or an ``examples/pretrain.py`` run
directory (its newest checkpoint) or one of its ``checkpoints/<name>`` directories; the tokenizer comes
from there (the byte tokenizer for the tiny pretraining runs; ``--tokenizer`` overrides). Greedy at
``--temperature 0`` (the default). On CUDA the decode step runs as a CUDA graph (``--no-cuda-graph``
for the eager path). ``--speculative K``: greedy speculative decoding, the checkpoint's MTP layer drafting
K tokens per verify forward (same text; the acceptance rate is printed on stderr). A bad argument or checkpoint prints one line on stderr (exit code 2); the libraries'
import and load messages are held back (``--debug`` shows them and tracebacks).
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None):
    from nemo_qwen3_next.checkpoint.cli import ArgumentParser  # usage errors as one line

    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="HF dir, NeMo dir, or a pretrain run / checkpoint dir")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--tokenizer", default=None, help="'byte' or a HF tokenizer path (default: the checkpoint's)")
    ap.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on CUDA")
    ap.add_argument("--speculative", type=int, default=None, metavar="K",
                    help="draft K tokens per step with the checkpoint's MTP layer (greedy only)")
    ap.add_argument("--debug", action="store_true", help="show library messages and tracebacks")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from nemo_qwen3_next.checkpoint.cli import quiet

    from nemo_qwen3_next.checkpoint import CheckpointError
    from nemo_qwen3_next.checkpoint.layout import layout
    from nemo_qwen3_next.field_checks import ConfigError, check_sampling, check_speculative

    try:
        check_sampling(args.temperature, args.top_k, args.top_p)  # stdlib checks before torch is imported
        if args.speculative is not None:
            check_speculative(args.speculative, args.temperature, 1)
        layout(args.checkpoint)
        if not args.prompt:
            raise ValueError("--prompt is empty")
        with quiet(not args.debug):  # megatron-core's import warnings
            import torch

            from nemo_qwen3_next.inference import stream
            from nemo_qwen3_next.inference.load import load_for_generation
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype]
        with quiet(not args.debug):
            model, codec = load_for_generation(args.checkpoint, args.device, dtype, args.tokenizer)
        if codec is None:
            raise CheckpointError(f"{args.checkpoint}: no tokenizer files; pass --tokenizer byte or a tokenizer path")
        ids = torch.tensor([codec.encode(args.prompt)])
        device = next(model.parameters()).device
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        new, shown, t_first = [], "", None
        tokens = stream(model, ids.to(device), args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, eos_token_id=codec.eos_id, seed=args.seed,
                        cuda_graph=False if args.no_cuda_graph else None, speculative_k=args.speculative)
        sys.stdout.write(args.prompt)
        for tok in tokens:
            t = int(tok[0])  # waits for the step: streaming is per token by nature
            if t_first is None:
                sync()
                t_first = time.perf_counter()
            if t == codec.eos_id:
                break
            new.append(t)
            text = codec.decode(new)
            if not text.endswith("\ufffd"):  # hold back an incomplete multi-byte character
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
        sync()
        t_end = time.perf_counter()
    except (CheckpointError, ConfigError, ValueError) as e:
        if args.debug:
            raise
        print(f"generate.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    sys.stdout.write(codec.decode(new)[len(shown):] + "\n")
    n_prompt, n_dec = ids.shape[1], max(len(new) - 1, 0)
    prefill_s, decode_s = t_first - t0, t_end - t_first
    print(f"prefill: {n_prompt} tokens in {prefill_s:.3f} s ({n_prompt / prefill_s:.1f} tokens/s); "
          f"decode: {n_dec} tokens in {decode_s:.3f} s ({n_dec / max(decode_s, 1e-9):.1f} tokens/s)", file=sys.stderr)
    if args.speculative is not None:
        print(tokens.stats, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
