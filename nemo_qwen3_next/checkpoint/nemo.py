"""Completeness of a NeMo 2 checkpoint directory, checked before any work is done.

Layout: ``weights/`` (Megatron ``torch_dist``: ``.metadata``, ``metadata.json``, ``common.pt``,
``*.distcp``), ``context/`` (``io.json`` + ``model.yaml``, NeMo's serialised model) and, written by
our converter, ``extra/``. `check_nemo_dir(deep=False)` is stdlib-only (files present, JSON parses);
`deep=True` also reads ``.metadata`` and checks that every stored chunk lies inside its file, so
a missing or truncated ``.distcp`` fails by name instead of deep inside torch.
"""

from __future__ import annotations

import os

from .errors import CheckpointError, read_json_object

REQUIRED = ("weights/.metadata", "weights/metadata.json", "weights/common.pt", "context/io.json")


def check_nemo_dir(nemo_dir: str, deep: bool = False) -> None:
    """Raise `CheckpointError` naming the first missing or damaged file of a NeMo checkpoint."""
    nemo_dir = os.fspath(nemo_dir)
    if not os.path.isdir(nemo_dir):
        raise CheckpointError(f"{nemo_dir} is not a directory; give a NeMo 2 checkpoint (weights/ + context/)")
    for sub in ("weights", "context"):
        if not os.path.isdir(os.path.join(nemo_dir, sub)):
            raise CheckpointError(f"{nemo_dir} is not a NeMo 2 checkpoint: {sub}/ is missing (needs weights/ and "
                                  f"context/)")
    hint = "the checkpoint is incomplete or damaged; copy or save it again"
    for rel in REQUIRED:
        path = os.path.join(nemo_dir, rel)
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            raise CheckpointError(f"{path} is missing or empty; {hint}")
    read_json_object(os.path.join(nemo_dir, "context", "io.json"), hint)
    read_json_object(os.path.join(nemo_dir, "weights", "metadata.json"), hint)
    extra_cfg = os.path.join(nemo_dir, "extra", "hf_config.json")
    if os.path.exists(extra_cfg):
        read_json_object(extra_cfg, "delete extra/ or convert the checkpoint again")
    weights = os.path.join(nemo_dir, "weights")
    if not any(fn.endswith(".distcp") for fn in os.listdir(weights)):
        raise CheckpointError(f"{weights} has no *.distcp files; {hint}")
    if deep:
        _check_storage(weights, hint)


def _check_storage(weights: str, hint: str) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(weights).read_metadata()
    except Exception as e:
        raise CheckpointError(f"{os.path.join(weights, '.metadata')} cannot be read ({type(e).__name__}: "
                              f"{str(e)[:200]}); {hint}") from None
    ends = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for rel, end in sorted(ends.items()):
        path = os.path.join(weights, rel)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing (listed in weights/.metadata); {hint}")
        size = os.path.getsize(path)
        if size < end:
            raise CheckpointError(f"{path} is truncated: weights/.metadata needs {end} bytes, the file has {size}; "
                                  f"{hint}")
