#!/usr/bin/env python3
"""Tokenize text into a Megatron indexed dataset (`<prefix>.bin` + `<prefix>.idx`) for pretraining.

    python scripts/prepare_pretraining_data.py --input shard-000.jsonl.gz shard-001.jsonl.gz \\
        --tokenizer /models/Qwen3-Next-80B-A3B-Instruct --output-prefix /data/qwen3next/web_text_document

Input: JSON lines (optionally .gz) with the text under --json-key, or plain .txt files (one
document per file). Each document gets the tokenizer's end-of-document token appended. The
tokenizer is a local Hugging Face tokenizer directory or hub name (``transformers.AutoTokenizer``),
or ``byte`` for the byte-level tokenizer of the tiny config. The output is written atomically.
Then train with ``data.paths='[/data/qwen3next/web_text_document]'`` or a blend
``data.paths='[0.7,/data/a_text_document,0.3,/data/b_text_document]'``.
"""

import argparse
import gzip
import json
import os
import sys
from multiprocessing import Pool

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_TOKENIZER = None


def _documents(paths, key):
    for path in paths:
        if path.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)[key]
                        except (KeyError, json.JSONDecodeError) as e:
                            raise SystemExit(f"{path}:{n}: no JSON field {key!r} ({e}); set --json-key") from None
        else:
            with open(path, encoding="utf-8") as f:
                yield f.read()


def _load_tokenizer(name):
    if name == "byte":
        from nemo_qwen3_next.training.tokenizer import ByteTokenizer

        tok = ByteTokenizer()
        return tok.text_to_ids, tok.eod, tok.vocab_size
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    eod = tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id
    if eod is None:
        raise SystemExit(f"tokenizer {name} has no eos/pad token to end documents with")
    return (lambda text: tok(text, add_special_tokens=False)["input_ids"]), eod, len(tok)


def _init(name):
    global _TOKENIZER
    _TOKENIZER = _load_tokenizer(name)


def _encode(text):
    return _TOKENIZER[0](text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True)
    ap.add_argument("--output-prefix", required=True)
    ap.add_argument("--tokenizer", required=True, help="HF tokenizer dir/name, or 'byte'")
    ap.add_argument("--json-key", default="text")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    args = ap.parse_args(argv)
    for path in args.input:
        if not os.path.exists(path):
            raise SystemExit(f"--input {path}: no such file")

    from nemo_qwen3_next.training.data import write_indexed_dataset

    _, eod, vocab = _load_tokenizer(args.tokenizer)
    docs = _documents(args.input, args.json_key)
    if args.workers > 1:
        with Pool(args.workers, initializer=_init, initargs=(args.tokenizer,)) as pool:
            prefix = write_indexed_dataset(pool.imap(_encode, docs, chunksize=64), args.output_prefix, eod=eod,
                                           vocab_size=vocab)
    else:
        _init(args.tokenizer)
        prefix = write_indexed_dataset(map(_encode, docs), args.output_prefix, eod=eod, vocab_size=vocab)
    print(f"wrote {prefix}.bin and {prefix}.idx")


if __name__ == "__main__":
    main()
