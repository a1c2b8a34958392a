"""Tensor-by-tensor writer and reader of Megatron ``torch_dist`` checkpoints (no NeMo imports).

* `save_dist_checkpoint_streaming`: writes a Megatron ``torch_dist`` distributed checkpoint
  with Megatron's own `dist_checkpointing.save` (same keys, `common.pt`, `metadata.json` and
  `.metadata` as a training run would write), but the model's sharded state dict holds *meta*
  tensors and each shard's data is produced on demand (`LazySavePlanner.resolve_data`) and
  written straight to disk (`StreamingFileSystemWriter`): one tensor in memory at a time.
* `DistCheckpointReader`: reads any region of any tensor of such a checkpoint, whatever TP/EP it
  was saved at, by reading only the stored chunks that overlap it.

Safetensors files are read and written by `nemo_qwen3_next.checkpoint` (the one validated reader).
"""

from __future__ import annotations

import io
import os
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)

# What NeMo's MegatronStrategy passes to `sharded_state_dict` (and stores as content metadata).
NEMO_SHARDED_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
PREFIX = "module."  # NeMo's distributed-checkpoint keys: module.<GPTModel state-dict name>

# (key, global offset) of one stored shard -> a function returning its data
ShardSource = Callable[[], torch.Tensor]


def _storage_info(relative_path: str, offset: int, length: int):
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    return _StorageInfo(relative_path=relative_path, offset=offset, length=length)


class StreamingFileSystemWriter(FileSystemWriter):
    """`FileSystemWriter` whose `write_data` resolves, writes and drops one item at a time.

    Same on-disk format as torch's writer (torch.save'd tensors and raw bytes appended to
    ``__<rank>_0.distcp``, located by `_StorageInfo`); torch's own loop keeps every tensor of a
    file alive until the file is closed, which is the whole model for a one-rank save.
    """

    def __init__(self, path, on_item: Optional[Callable[[int], None]] = None):
        super().__init__(path, single_file_per_rank=True, sync_files=False, thread_count=1)
        self.on_item = on_item

    def write_data(self, plan, planner) -> torch.futures.Future:
        fname = f"{plan.storage_data.prefix}0.distcp"
        results = []
        with open(os.path.join(self.path, fname), "wb") as f:
            for item in plan.items:
                data = planner.resolve_data(item)
                offset = f.tell()
                if item.type == WriteItemType.BYTE_IO:
                    f.write(data.getbuffer())
                else:
                    t = data.detach()
                    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
                        t = t.clone()  # torch.save writes whole storages: never a view
                    torch.save(t, f)
                    if self.on_item:
                        self.on_item(t.numel() * t.element_size())
                length = f.tell() - offset
                results.append(WriteResult(index=item.index, size_in_bytes=length,
                                           storage_data=_storage_info(fname, offset, length)))
                del data
        fut = torch.futures.Future()
        fut.set_result(results)
        return fut


class LazySavePlanner(MCoreSavePlanner):
    """Megatron's save planner, except tensor data comes from `sources[(fqn, offsets)]()`."""

    def __init__(self, sources: Dict[Tuple[str, Tuple[int, ...]], ShardSource], **kw):
        super().__init__(**kw)
        self.sources = sources
        self.resolved = set()

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        key = (write_item.index.fqn, tuple(write_item.tensor_data.chunk.offsets))
        if key not in self.sources:
            raise KeyError(f"no source for checkpoint shard {key[0]} at offset {key[1]}")
        if key in self.resolved:
            raise RuntimeError(f"checkpoint shard {key[0]} at offset {key[1]} written twice")
        self.resolved.add(key)
        t = self.sources[key]()
        return t.reshape(write_item.tensor_data.chunk.sizes)


class StreamingTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
    """Megatron's ``torch_dist`` save strategy, synchronous, with lazily produced shard data."""

    def __init__(self, sources, on_item=None):
        super().__init__("torch_dist", 1)
        self.sources, self.on_item = sources, on_item
        self.planner = None

    def save(self, sharded_state_dict, checkpoint_dir):
        from torch.distributed.checkpoint import state_dict_saver

        sd, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
        pyt_sd = mcore_to_pyt_state_dict(sd, False)
        self.planner = LazySavePlanner(self.sources, dedup_replicated_tensors=False, flatten_state_dict=False)
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            state_dict_saver.save(pyt_sd, storage_writer=StreamingFileSystemWriter(checkpoint_dir, self.on_item),
                                  planner=self.planner, no_dist=True)
        except CheckpointException as e:  # re-raise what went wrong, not torch's per-rank wrapper
            for failure in e.failures.values():  # torch wraps each as (exception, traceback)
                inner = failure[0] if isinstance(failure, tuple) else getattr(failure, "exception", failure)
                if isinstance(inner, BaseException):
                    raise inner from None
            raise


def save_dist_checkpoint_streaming(sharded_state_dict, checkpoint_dir: str,
                                   sources: Dict[Tuple[str, Tuple[int, ...]], ShardSource],
                                   content_metadata: Optional[dict] = None, on_item=None) -> None:
    """`dist_checkpointing.save` of a sharded state dict of meta tensors, data from `sources`.

    Every stored tensor shard must have exactly one source and every source must be used.
    """
    from megatron.core import dist_checkpointing

    strategy = StreamingTorchDistSaveStrategy(sources, on_item)
    dist_checkpointing.save(sharded_state_dict, checkpoint_dir, sharded_strategy=strategy,
                            content_metadata=content_metadata)
    unused = sorted(set(sources) - strategy.planner.resolved)
    if unused:
        raise RuntimeError(f"{len(unused)} converted tensors were not written, e.g. {unused[0]}")


class _Window(io.RawIOBase):
    """Read-only file object over bytes [offset, offset + length) of an open file."""

    def __init__(self, f, offset: int, length: int):
        self.f, self.start, self.length, self.pos = f, offset, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, pos, whence=0):
        self.pos = {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence]
        return self.pos

    def readinto(self, b):
        n = max(0, min(len(b), self.length - self.pos))
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(b)[:n])
        self.pos += got
        return got


class DistCheckpointReader:
    """Region reads from a ``torch_dist`` checkpoint directory (any TP/EP layout it was saved at)."""

    def __init__(self, path: str):
        self.path = path
        self.metadata = FileSystemReader(path).read_metadata()
        self._file_name, self._file = None, None

    def keys(self):
        return self.metadata.state_dict_metadata.keys()

    def global_shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self.metadata.state_dict_metadata[key].size)

    def _read_chunk(self, key: str, offsets) -> torch.Tensor:
        info = self.metadata.storage_data[MetadataIndex(key, torch.Size(offsets))]
        if info.relative_path != self._file_name:
            if self._file:
                self._file.close()
            self._file_name = info.relative_path
            self._file = open(os.path.join(self.path, info.relative_path), "rb")
        # torch.load straight from a window onto the file: no intermediate bytes copy
        return torch.load(_Window(self._file, info.offset, info.length), weights_only=True)

    def read_exact(self, key: str, offsets: Sequence[int], sizes: Sequence[int]) -> Optional[torch.Tensor]:
        """The stored chunk that is exactly this region (the common case), else None."""
        md = self.metadata.state_dict_metadata.get(key)
        for chunk in getattr(md, "chunks", ()):
            if tuple(chunk.offsets) == tuple(offsets) and tuple(chunk.sizes) == tuple(sizes):
                return self._read_chunk(key, chunk.offsets)
        return None

    def read(self, key: str, offsets: Sequence[int], sizes: Sequence[int], out: torch.Tensor) -> None:
        """Fill `out` (shape `sizes`) with the region of tensor `key` starting at `offsets`."""
        md = self.metadata.state_dict_metadata.get(key)
        if md is None:
            raise KeyError(f"distributed checkpoint {self.path} has no tensor {key!r}")
        covered = 0
        for chunk in md.chunks:
            lo = [max(a, b) for a, b in zip(offsets, chunk.offsets)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(offsets, sizes, chunk.offsets, chunk.sizes)]
            if any(h <= l for l, h in zip(lo, hi)):
                continue
            data = self._read_chunk(key, chunk.offsets)
            src, dst = data, out
            for d, (l, h) in enumerate(zip(lo, hi)):
                src = src.narrow(d, l - chunk.offsets[d], h - l)
                dst = dst.narrow(d, l - offsets[d], h - l)
            dst.copy_(src)
            covered += src.numel()
            del data
        if covered != out.numel():
            raise ValueError(f"distributed checkpoint tensor {key!r} does not cover region {tuple(offsets)}+"
                             f"{tuple(sizes)} ({covered} of {out.numel()} elements stored)")

    def close(self):
        if self._file:
            self._file.close()
            self._file = None
