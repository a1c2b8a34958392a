"""Training data: Megatron indexed datasets (`.bin/.idx`, blends) through NeMo's
`PreTrainingDataModule`, the embedded corpus that needs no download, and random tokens (`data=mock`).

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


class MockDataset:
    """Uniform random token ids in [0, vocab_size): sample `i` of split `s` comes from
    ``np.random.default_rng([seed, s, i])``, so batches depend only on (seed, split, index), never on
    the rank, worker or a resume. The attention mask is one ``False`` (nothing padded; causality is
    the attention's own): a dense ``[1, s, s]`` mask would be 16 MB per sample at s = 4096, copied to
    the GPU with every batch, which a throughput run must not time."""

    SPLITS = {"train": 0, "validation": 1, "test": 2}

    def __init__(self, vocab_size: int, seq_length: int, num_samples: int, seed: int, split: str):
        import torch

        self.vocab_size, self.seq_length, self.num_samples = vocab_size, seq_length, num_samples
        self.seed, self.split = seed, self.SPLITS[split]
        self.loss_mask = torch.ones(seq_length, dtype=torch.float)
        self.position_ids = torch.arange(seq_length, dtype=torch.int64)
        self.attention_mask = torch.zeros(1, 1, 1, dtype=torch.bool)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int):
        import torch

        rng = np.random.default_rng([self.seed, self.split, int(idx)])
        tokens = torch.from_numpy(rng.integers(self.vocab_size, size=self.seq_length + 1, dtype=np.int64))
        return {"tokens": tokens[:-1], "labels": tokens[1:], "loss_mask": self.loss_mask,
                "position_ids": self.position_ids, "attention_mask": self.attention_mask}

    @staticmethod
    def collate_fn(batch):
        from torch.utils.data import default_collate

        return default_collate(batch)


def make_mock_data_module(cfg, tokenizer, seq_length: int, micro_batch_size: int, global_batch_size: int, seed: int):
    """NeMo's `MockDataModule` (Megatron sampler, resume by consumed samples) over `MockDataset`."""
    import torch
    from nemo.collections.llm.gpt.data.mock import MockDataModule

    class _Module(MockDataModule):
        def setup(self, stage: str = "") -> None:  # NeMo's passes its mask flag into the seed slot
            sizes = {"train": self.num_train_samples, "validation": self.num_val_samples, "test": self.num_test_samples}
            self._train_ds, self._validation_ds, self._test_ds = (
                MockDataset(tokenizer.vocab_size, self.seq_length, sizes[s], seed, s) for s in sizes)

    return _Module(seq_length=seq_length, tokenizer=tokenizer, micro_batch_size=micro_batch_size,
                   global_batch_size=global_batch_size, num_workers=cfg.num_workers,
                   pin_memory=cfg.pin_memory and torch.cuda.is_available(),
                   persistent_workers=cfg.num_workers > 0)  # workers started once, not per epoch / validation


def make_data_module(cfg, tokenizer, seq_length: int, micro_batch_size: int, global_batch_size: int, seed: int):
    """NeMo `PreTrainingDataModule` for `cfg.data` (embedded corpus when `cfg.data.paths` is empty),
    or random tokens with `cfg.data.mock`."""
    from nemo.collections.llm.gpt.data.pre_training import PreTrainingDataModule

    if cfg.mock:
        return make_mock_data_module(cfg, tokenizer, seq_length, micro_batch_size, global_batch_size, seed)
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
