"""Training data: Megatron indexed datasets (`.bin/.idx`, blends) through NeMo's
`PreTrainingDataModule`, and the embedded corpus that needs no download.

The embedded corpus is real English prose already on every machine that runs Python: the
docstrings of the Python standard library (module, class and function docstrings, one document
per module, files in sorted order). `build_embedded_corpus` writes it once, byte-tokenized, as an
ordinary indexed dataset, so the default config and a real run share one data path.
Writes are atomic (temp dir + rename), so concurrent ranks or a killed run never leave a
half-written dataset behind.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import os
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

EMBEDDED_PREFIX = "stdlib_docstrings"
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "ensurepip", "turtledemo"}


def stdlib_documents(stdlib_dir: Optional[str] = None) -> Iterator[str]:
    """One text document per standard-library module: its docstrings, in source order."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not (_SKIP_DIRS & set(p.relative_to(root).parts[:-1])))
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc and len(doc) >= 40:
                    parts.append(inspect.cleandoc(doc))
        if parts:
            yield "\n\n".join(parts)


def write_indexed_dataset(token_docs: Iterable[Sequence[int]], prefix: str, eod: Optional[int] = None,
                          vocab_size: int = 65535) -> str:
    """Write documents of token ids as `<prefix>.bin/.idx` (Megatron format), atomically.

    `token_docs` is consumed lazily (a generator streams a corpus of any size); tokens are stored
    as uint16 when the vocabulary fits, else int32. Returns the prefix."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = os.path.abspath(prefix)
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(prefix), prefix=".tmp_")
    tmp_prefix = os.path.join(tmp, "data")
    dtype = np.uint16 if vocab_size <= 65535 else np.int32
    builder = IndexedDatasetBuilder(tmp_prefix + ".bin", dtype=dtype)
    for ids in token_docs:
        ids = list(ids) + ([eod] if eod is not None else [])
        builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
    builder.finalize(tmp_prefix + ".idx")
    # .bin first: a reader keys on the .idx, which appears last.
    os.replace(tmp_prefix + ".bin", prefix + ".bin")
    os.replace(tmp_prefix + ".idx", prefix + ".idx")
    os.rmdir(tmp)
    return prefix


def build_embedded_corpus(out_dir: str, tokenizer, max_bytes: int = 8_000_000) -> str:
    """The embedded corpus as an indexed dataset under `out_dir`; built once, then reused.

    Returns the path prefix (without `.bin/.idx`). The file name carries a hash of the Python
    install and version, so a different Python (different docstrings) gets its own files.
    """
    stdlib = sysconfig.get_paths()["stdlib"]
    key = f"{stdlib}|{sys.version}|{max_bytes}|{type(tokenizer).__name__}|{tokenizer.vocab_size}"
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:10]
    prefix = os.path.join(os.path.abspath(out_dir), f"{EMBEDDED_PREFIX}_{digest}")
    if os.path.exists(prefix + ".bin") and os.path.exists(prefix + ".idx"):
        return prefix
    docs, total = [], 0
    for doc in stdlib_documents(stdlib):
        docs.append(doc)
        total += len(doc)
        if total >= max_bytes:
            break
    if not docs:
        raise RuntimeError(f"found no standard-library sources under {stdlib} to build the embedded corpus; "
                           "set data.paths to an indexed dataset instead.")
    write_indexed_dataset((tokenizer.text_to_ids(d) for d in docs), prefix, eod=tokenizer.eod,
                          vocab_size=tokenizer.vocab_size)
    return prefix


def make_data_module(cfg, tokenizer, seq_length: int, micro_batch_size: int, global_batch_size: int, seed: int):
    """NeMo `PreTrainingDataModule` for `cfg.data` (embedded corpus when `cfg.data.paths` is empty)."""
    from nemo.collections.llm.gpt.data.pre_training import PreTrainingDataModule

    paths = cfg.paths
    if not paths:
        paths = [build_embedded_corpus(cfg.cache_dir, tokenizer, cfg.embedded_max_bytes)]
    elif not isinstance(paths, (str, list, dict)):
        paths = _to_container(paths)
    module = PreTrainingDataModule(
        paths=paths,
        seq_length=seq_length,
        tokenizer=tokenizer,
        micro_batch_size=micro_batch_size,
        global_batch_size=global_batch_size,
        num_workers=cfg.num_workers,
        pin_memory=cfg.pin_memory,
        persistent_workers=False,
        split=cfg.split,
        index_mapping_dir=cfg.index_mapping_dir or cfg.cache_dir,
        seed=seed,
        reset_position_ids=cfg.reset_position_ids,
        reset_attention_mask=cfg.reset_attention_mask,
        eod_mask_loss=cfg.eod_mask_loss,
    )
    # Without TransformerEngine, NeMo's data module and forward step insist on a dense [1, s, s]
    # causal mask per sample (an assert in gpt_forward_step); our SDPA core attention accepts it.
    return module


def _to_container(x):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(x, resolve=True)
