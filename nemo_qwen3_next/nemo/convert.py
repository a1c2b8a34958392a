"""Streaming, validated, atomic HF <-> NeMo 2 checkpoint conversion for Qwen3-Next.

Memory: nothing ever holds the model. The target model is built on the *meta* device only to
learn its tensors (names, shapes, distributed-checkpoint keys and offsets); then each tensor is
read from the source, converted with the core's mapping table (`hf_mapping.weight_plan`, the
only mapping there is), written, and dropped. Peak RSS ~ baseline + the largest tensor (+ its
inputs for the few tensors that concatenate two HF tensors).

Validation happens *before* anything is written, from file headers only: config.json parses and
is valid, every safetensors file is complete, every HF tensor is either consumed or explicitly
carried/skipped (``mtp.*`` multi-token-prediction weights are carried unchanged in a side file,
see below; a tied ``lm_head.weight`` is skipped), and every HF tensor has exactly the shape the
config implies. Output goes to a temporary directory beside the target, renamed into place at the end;
on any error it is removed, so a failed conversion leaves nothing behind.

NeMo checkpoint layout (what `llm.import_ckpt` writes): ``<dir>/weights`` = Megatron ``torch_dist``
distributed checkpoint with keys ``module.<GPTModel state-dict name>`` (loads at any TP/PP/EP),
``<dir>/context`` = NeMo's serialised `Qwen3NextModel` (config + tokenizer), and ``<dir>/extra``
(written by this converter; the model never reads it): ``mtp.safetensors`` = the HF ``mtp.*``
tensors byte for byte (our Megatron model has no MTP block yet), ``hf_config.json`` = the input
config.json fields the core config does not produce (e.g. ``num_nextn_predict_layers``,
``bos_token_id``). Export writes both back, so an HF -> NeMo -> HF round trip keeps them.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from ..config import ConfigError, Qwen3NextConfig
from ..hf_mapping import skipped_hf_names, weight_plan
from ..loading import CheckpointError, SafetensorsReader
from ..model import build_model, init_single_process
from .streaming import (DistCheckpointReader, SafetensorsFileReader, SafetensorsStreamWriter,
                        copy_safetensors_tensors, save_dist_checkpoint_streaming)

# What NeMo's MegatronStrategy passes to `sharded_state_dict` (and stores as content metadata).
NEMO_SHARDED_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
PREFIX = "module."
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "bfloat16": torch.bfloat16, "float32": torch.float32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")
EXTRA_DIR = "extra"  # <nemo_dir>/extra: what the NeMo model does not use but an HF export needs back
MTP_FILE = "mtp.safetensors"  # HF `mtp.*` tensors, unchanged
HF_CONFIG_EXTRA = "hf_config.json"  # input config.json fields that `Qwen3NextConfig.to_hf_dict` lacks
_NOT_CARRIED_CONFIG = ("torch_dtype", "dtype")  # export writes the dtype the checkpoint holds


class ConversionError(CheckpointError):
    """The input cannot be converted; the message names the file / tensor / field and the fix."""


@dataclass
class ConversionReport:
    output: str
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    skipped: List[str] = field(default_factory=list)
    carried: List[str] = field(default_factory=list)  # HF tensors stored unchanged, not used by the model
    carried_bytes: int = 0

    @property
    def gb_per_s(self) -> float:
        return (self.bytes + self.carried_bytes) / 1e9 / max(self.seconds, 1e-9)

    def __str__(self):
        s = (f"wrote {self.output}: {self.tensors} tensors, {self.bytes / 1e9:.3f} GB in {self.seconds:.1f} s "
             f"({self.gb_per_s:.2f} GB/s)")
        if self.skipped:
            s += f"; skipped {len(self.skipped)} HF tensors: {', '.join(self.skipped[:8])}" + (
                " ..." if len(self.skipped) > 8 else "")
        if self.carried:
            s += (f"; carried, not used by the model: {len(self.carried)} tensors "
                  f"({self.carried_bytes / 1e9:.3f} GB, {', '.join(self.carried[:4])}"
                  + (" ..." if len(self.carried) > 4 else "") + ")")
        return s


# ---------------------------------------------------------------------- atomic output
@contextmanager
def atomic_output_dir(output: str, overwrite: bool):
    """Yield a temporary directory beside `output`; rename it to `output` only on success."""
    output = os.path.abspath(output)
    if os.path.exists(output) and not overwrite:
        raise ConversionError(f"output {output} already exists; pass --overwrite (overwrite=True) to replace it")
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(output)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(output):
        old = os.path.join(parent, f".{os.path.basename(output)}.old-{os.getpid()}")
        os.rename(output, old)
    os.rename(tmp, output)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True)


# ---------------------------------------------------------------------- the target model's tensors
def core_config_from_hf_dir(hf_dir: str, dtype: torch.dtype) -> Qwen3NextConfig:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise ConversionError(f"{hf_dir}: no config.json; the input must be a Hugging Face model directory")
    try:
        with open(path) as f:
            hf = json.load(f)
        if hf.get("model_type") not in (None, "qwen3_next"):
            raise ConfigError(f"model_type = {hf.get('model_type')!r}, expected 'qwen3_next'")
        cfg = Qwen3NextConfig.from_hf(hf, **_dtype_kw(dtype))
    except (ConfigError, KeyError, ValueError, TypeError) as e:
        raise ConversionError(f"{path}: {e}") from None
    return cfg.replace(mtp_num_layers=None)  # no MTP block: `mtp.*` weights are carried in extra/


def _dtype_kw(dtype):
    return dict(params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                use_cpu_initialization=True, perform_initialization=False)


def meta_model(config: Qwen3NextConfig):
    """The TP=1 Megatron `GPTModel` on the meta device (shapes and checkpoint layout, no memory)."""
    init_single_process()
    with torch.device("meta"):
        return build_model(config, backend="local")


@dataclass
class _Piece:
    ours: str  # GPTModel state-dict name (TP=1)
    key: str  # distributed-checkpoint key
    offsets: Tuple[int, ...]  # global offset of this stored shard
    size: Tuple[int, ...]  # view of the full tensor this shard holds ...
    stride: Tuple[int, ...]
    storage_offset: int
    chunk: Tuple[int, ...]  # ... and its stored (chunk) shape


def sharded_layout(model) -> Tuple[dict, Dict[str, List[_Piece]], Dict[str, torch.Size]]:
    """The NeMo-style sharded state dict of `model` (factories already built) and, per parameter,
    the stored shards it is split into."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, is_main_replica
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    sd = model.sharded_state_dict(prefix=PREFIX, metadata=dict(NEMO_SHARDED_METADATA))
    pieces: Dict[str, List[_Piece]] = {}
    shapes: Dict[str, torch.Size] = {}
    for name in list(sd):
        v = sd[name]
        if not isinstance(v, (ShardedTensor, ShardedTensorFactory)):
            continue
        ours = name[len(PREFIX):]
        base = v.data
        if isinstance(v, ShardedTensorFactory):
            sd[name] = v = v.build()
        shapes[ours] = base.shape
        for sh in nested_values(v) if not isinstance(v, ShardedTensor) else [v]:
            if not is_main_replica(sh.replica_id):
                continue
            chunk = tuple(1 for _ in range(sh.prepend_axis_num)) + tuple(sh.local_shape)
            pieces.setdefault(ours, []).append(_Piece(
                ours, sh.key, tuple(sh.global_offset), tuple(sh.data.shape), tuple(sh.data.stride()),
                sh.data.storage_offset() - base.storage_offset(), chunk))
    return sd, pieces, shapes


# ---------------------------------------------------------------------- HF -> NeMo
def _open_hf(hf_dir: str) -> "_PlainReader":
    """The HF weights, after checking every file is present, complete and lists what the index says."""
    from safetensors import safe_open

    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted({os.path.join(hf_dir, v) for v in json.load(f)["weight_map"].values()})
    else:
        files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    for fn in files:
        if not os.path.exists(fn):
            raise ConversionError(f"{fn} is listed in model.safetensors.index.json but does not exist")
        _check_complete(fn)
    try:
        reader = SafetensorsReader(hf_dir)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    for fn in files:
        try:
            with safe_open(fn, "pt") as f:
                names = set(f.keys())
        except Exception as e:
            raise ConversionError(f"{fn} is not a valid safetensors file (truncated or corrupt?): {e}") from None
        listed = {k for k, v in reader.index.items() if v == fn}
        if listed - names:
            raise ConversionError(f"{fn} lacks tensor {sorted(listed - names)[0]!r} that the index lists")
    return _PlainReader(reader.index)


class _PlainReader:
    """name -> tensor over a HF directory with plain file reads (safetensors' mmap would count every
    page it touches in RSS); keeps one file open."""

    def __init__(self, index):
        self.index = index
        self._file = None

    def keys(self):
        return self.index.keys()

    def file(self, name) -> SafetensorsFileReader:
        fn = self.index[name]
        if self._file is None or self._file.path != fn:
            if self._file:
                self._file.close()
            self._file = SafetensorsFileReader(fn)
        return self._file

    def __getitem__(self, name):
        return self.file(name).get(name)


def _check_complete(fn: str) -> None:
    """The file holds every byte its header promises (a cut-off download fails here, by name)."""
    import struct

    size = os.path.getsize(fn)
    try:
        with open(fn, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > size:
                raise ValueError("header length exceeds the file size")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except Exception as e:
        raise ConversionError(f"{fn} is not a valid safetensors file (truncated or corrupt?): {e}") from None
    if size < 8 + n + end:
        raise ConversionError(f"{fn} is truncated: its header promises {8 + n + end} bytes, the file has {size}; "
                              f"re-download or re-save it")


def validate_hf(reader: "_PlainReader", config: Qwen3NextConfig, model) -> Tuple[list, List[str], List[str]]:
    """Names and shapes of the HF checkpoint against `config`; returns (plan, skipped names,
    carried names = the `mtp.*` tensors the model does not use, kept unchanged)."""
    plan = weight_plan(config)
    names = set(reader.keys())
    needed = [n for e in plan for n in e.hf]
    missing = [n for n in needed if n not in names]
    if missing:
        raise ConversionError(f"HF tensor {missing[0]!r} is missing ({len(missing)} missing in all); "
                              f"config.json and the weights disagree, or the checkpoint is incomplete")
    carried = skipped_hf_names(names, config)  # mtp.*
    skipped = []
    if config.tie_word_embeddings and "lm_head.weight" in names:
        skipped.append("lm_head.weight")  # tied: same tensor as the embedding
    unknown = sorted(names - set(needed) - set(skipped) - set(carried))
    if unknown:
        raise ConversionError(f"HF checkpoint has unexpected tensor {unknown[0]!r} ({len(unknown)} in all); "
                              f"config.json and the weights disagree (e.g. num_hidden_layers, num_experts, "
                              f"layer_types)")
    params = dict(model.state_dict())
    hf_shapes = {n: reader.file(n).shape(n) for n in needed}
    for e in plan:
        if e.ours not in params:
            raise ConversionError(f"model has no tensor {e.ours!r}; check the config")
        expected = [tuple(t.shape) for t in e.to_hf(params[e.ours])]
        for n, shp in zip(e.hf, expected):
            if hf_shapes[n] != shp:
                raise ConversionError(f"HF tensor {n!r} has shape {hf_shapes[n]}, config.json implies {shp}; "
                                      f"config.json and the weights disagree")
    for n in carried:
        try:
            reader.file(n).dtype(n)
        except ValueError as e:
            raise ConversionError(str(e)) from None
    return plan, skipped, carried


class _Converter:
    """Produces each full tensor of ours once, from HF tensors, keeping only the latest one."""

    def __init__(self, plan, reader, dtype, shapes):
        self.plan = {e.ours: e for e in plan}
        self.reader, self.dtype, self.shapes = reader, dtype, shapes
        self.name, self.tensor = None, None
        self.computed: Dict[str, int] = {}

    def full(self, ours: str) -> torch.Tensor:
        if ours != self.name:
            self.name, self.tensor = None, None  # drop the previous tensor before reading the next
            e = self.plan[ours]
            t = e.to_ours([self.reader[n] for n in e.hf])
            if tuple(t.shape) != tuple(self.shapes[ours]):
                raise ConversionError(f"{ours} (from {', '.join(e.hf)}) has shape {tuple(t.shape)}, model "
                                      f"expects {tuple(self.shapes[ours])}: config.json and weights disagree")
            self.name, self.tensor = ours, t.to(self.dtype).contiguous()
            self.computed[ours] = self.computed.get(ours, 0) + 1
        return self.tensor

    def source(self, p: _Piece):
        def get():
            return self.full(p.ours).as_strided(p.size, p.stride, p.storage_offset)
        return get


def hf_to_dist_checkpoint(hf_dir: str, weights_dir: str, dtype: Optional[torch.dtype] = None,
                          progress: bool = True, extra_dir: Optional[str] = None
                          ) -> Tuple[Qwen3NextConfig, ConversionReport]:
    """Validate a HF directory and write its weights as a Megatron distributed checkpoint in
    `weights_dir` (must exist, empty). Megatron + torch only (no NeMo).

    `extra_dir`: where the `mtp.*` tensors go, unchanged (`extra_dir/mtp.safetensors`, streamed one
    tensor at a time); None skips them (listed in the report)."""
    dtype = dtype or _hf_dtype(hf_dir)
    config = core_config_from_hf_dir(hf_dir, dtype)
    reader = _open_hf(hf_dir)
    model = meta_model(config)
    plan, skipped, carried = validate_hf(reader, config, model)
    if extra_dir is None:
        skipped, carried = sorted(skipped + carried), []
    sd, pieces, shapes = sharded_layout(model)
    planned = {e.ours for e in plan}
    unmapped = sorted(set(pieces) - planned)
    if unmapped:
        raise ConversionError(f"model tensor {unmapped[0]!r} has no HF source in the mapping table")
    conv = _Converter(plan, reader, dtype, shapes)
    sources = {(p.key, p.offsets): conv.source(p) for ps in pieces.values() for p in ps}
    total = sum(shapes[o].numel() for o in planned) * torch.empty((), dtype=dtype).element_size()
    total += sum(int(torch.Size(reader.file(n).shape(n)).numel()) * reader.file(n).dtype(n).itemsize
                 for n in carried)
    report = ConversionReport(output=weights_dir, skipped=skipped, carried=carried)
    bar = _progress(total, "hf->nemo", progress)

    def on_item(nbytes):
        report.bytes += nbytes
        if bar:
            bar.update(nbytes)

    t0 = time.perf_counter()
    save_dist_checkpoint_streaming(sd, weights_dir, sources, content_metadata=dict(NEMO_SHARDED_METADATA),
                                   on_item=on_item)
    if carried:
        os.makedirs(extra_dir, exist_ok=True)
        report.carried_bytes = copy_safetensors_tensors(carried, reader.file, os.path.join(extra_dir, MTP_FILE),
                                                        on_item=bar.update if bar else None)
    report.seconds = time.perf_counter() - t0
    if bar:
        bar.close()
    not_filled = sorted(planned - set(conv.computed))
    if not_filled:
        raise ConversionError(f"model tensor {not_filled[0]!r} was never written")
    report.tensors = len(conv.computed)
    return config, report


def _hf_dtype(hf_dir: str) -> torch.dtype:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise ConversionError(f"{hf_dir}: no config.json; the input must be a Hugging Face model directory")
    with open(path) as f:
        hf = json.load(f)
    name = hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"  # transformers >= 4.56 writes "dtype"
    if name not in DTYPES:
        raise ConversionError(f"config.json torch_dtype = {name!r}; pass dtype bf16 or fp32 explicitly")
    return DTYPES[name]


def convert_hf_to_nemo(hf_dir: str, output: str, dtype: Optional[str] = None, overwrite: bool = False,
                       progress: bool = True) -> ConversionReport:
    """HF Qwen3-Next directory -> NeMo 2 checkpoint directory (`weights/` + `context/`).

    `dtype`: 'bf16' | 'fp32' | None (the checkpoint's `torch_dtype`)."""
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype = {dtype!r}; use 'bf16' or 'fp32'")
    hf_dir = os.fspath(hf_dir)
    torch_dtype = DTYPES[dtype] if dtype else None
    with atomic_output_dir(output, overwrite) as tmp:
        weights = os.path.join(tmp, "weights")
        os.makedirs(weights)
        extra = os.path.join(tmp, EXTRA_DIR)
        config, report = hf_to_dist_checkpoint(hf_dir, weights, torch_dtype, progress, extra_dir=extra)
        extra_cfg = _hf_config_extras(hf_dir, config)
        if extra_cfg:
            os.makedirs(extra, exist_ok=True)
            with open(os.path.join(extra, HF_CONFIG_EXTRA), "w") as f:
                json.dump(extra_cfg, f, indent=2)
        from .model import write_context

        write_context(config, hf_dir, os.path.join(tmp, "context"))
    report.output = os.path.abspath(output)
    return report


def _hf_config_extras(hf_dir: str, config: Qwen3NextConfig) -> dict:
    """The input config.json fields that `config.to_hf_dict()` does not produce (and not the dtype,
    which export takes from the checkpoint), e.g. `num_nextn_predict_layers`, token ids."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf = json.load(f)
    ours = config.to_hf_dict()
    return {k: v for k, v in hf.items() if k not in ours and k not in _NOT_CARRIED_CONFIG}


# ---------------------------------------------------------------------- NeMo -> HF
def _shard_layout(entries: List[Tuple[str, torch.dtype, Tuple[int, ...]]], max_shard_bytes: int):
    shards, cur, size = [], [], 0
    for name, dtype, shape in entries:
        n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, dtype, shape))
        size += n
    if cur:
        shards.append(cur)
    return shards


def dist_checkpoint_to_hf(weights_dir: str, config: Qwen3NextConfig, out_dir: str,
                          max_shard_bytes: int = 5 * 1024**3, progress: bool = True,
                          extra_dir: Optional[str] = None) -> ConversionReport:
    """Stream a Megatron distributed checkpoint of Qwen3-Next into HF safetensors shards + index.

    `extra_dir` (a NeMo checkpoint's `extra/`, may be absent): its `mtp.safetensors` tensors are
    written back unchanged after the model's, and its `hf_config.json` fields into config.json."""
    dtype = config.params_dtype
    model = meta_model(config)
    _, pieces, shapes = sharded_layout(model)
    plan = weight_plan(config)
    try:
        reader = DistCheckpointReader(weights_dir)
    except Exception as e:
        raise ConversionError(f"{weights_dir}: not a Megatron torch_dist checkpoint ({e})") from None
    for ps in pieces.values():
        for p in ps:
            if p.key not in reader.metadata.state_dict_metadata:
                raise ConversionError(f"NeMo checkpoint {weights_dir} lacks tensor {p.key!r}; "
                                      f"the checkpoint's context/ config and weights/ disagree")
    params = dict(model.state_dict())
    entries = []
    for e in plan:
        for n, t in zip(e.hf, e.to_hf(params[e.ours])):
            entries.append((n, dtype, tuple(t.shape)))
    side, carried, extra_cfg = _open_extra(extra_dir, {n for n, _, _ in entries})
    entries += [(n, side.dtype(n), side.shape(n)) for n in carried]
    shards = _shard_layout(entries, max_shard_bytes)
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {n: files[i] for i, s in enumerate(shards) for n, _, _ in s}
    total = sum(int(torch.Size(s).numel()) * torch.empty((), dtype=d).element_size() for _, d, s in entries)
    report = ConversionReport(output=out_dir, tensors=len(entries) - len(carried), carried=carried)
    bar = _progress(total, "nemo->hf", progress)
    t0 = time.perf_counter()
    shard_i, writer = 0, SafetensorsStreamWriter(os.path.join(out_dir, files[0]), shards[0])
    left = len(shards[0])

    def write(n, t):
        nonlocal writer, shard_i, left
        if left == 0:
            writer.close()
            shard_i += 1
            writer = SafetensorsStreamWriter(os.path.join(out_dir, files[shard_i]), shards[shard_i])
            left = len(shards[shard_i])
        writer.write(n, t)
        left -= 1
        nbytes = t.numel() * t.element_size()
        if bar:
            bar.update(nbytes)
        return nbytes

    for e in plan:
        ps, shape = pieces[e.ours], shapes[e.ours]
        full = None
        if len(ps) == 1 and ps[0].size == tuple(shape) and ps[0].storage_offset == 0:
            full = reader.read_exact(ps[0].key, ps[0].offsets, ps[0].chunk)  # no second copy
            full = None if full is None else full.to(dtype).view(shape)
            ps = [] if full is not None else ps
        if full is None:
            full = torch.empty(shape, dtype=dtype)
        for p in ps:
            region = full.as_strided(p.size, p.stride, p.storage_offset)
            try:
                reader.read(p.key, p.offsets, p.chunk, region.view(p.chunk))  # in place
            except RuntimeError:  # region not viewable as the chunk shape: go through a buffer
                buf = torch.empty(p.chunk, dtype=dtype)
                reader.read(p.key, p.offsets, p.chunk, buf)
                region.copy_(buf.reshape(p.size))
                del buf
        for n, t in zip(e.hf, e.to_hf(full)):
            report.bytes += write(n, t.to(dtype))
        del full
    for n in carried:  # unchanged: same name, dtype and bytes as in the HF input
        t = side.get(n)
        report.carried_bytes += write(n, t)
        del t
    if side:
        side.close()
    writer.close()
    reader.close()
    if bar:
        bar.close()
    report.seconds = time.perf_counter() - t0
    if len(files) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf_cfg = config.to_hf_dict()
    hf_cfg.update({k: v for k, v in extra_cfg.items() if k not in hf_cfg and k not in _NOT_CARRIED_CONFIG})
    hf_cfg["torch_dtype"] = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}[dtype]
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    return report


def _open_extra(extra_dir: Optional[str], model_names) -> Tuple[Optional[SafetensorsFileReader], List[str], dict]:
    """(reader of extra/mtp.safetensors or None, its tensor names, extra config.json fields)."""
    side, carried, extra_cfg = None, [], {}
    if not extra_dir:
        return side, carried, extra_cfg
    mtp = os.path.join(extra_dir, MTP_FILE)
    if os.path.exists(mtp):
        _check_complete(mtp)
        side = SafetensorsFileReader(mtp)
        carried = sorted(side.keys())
        clash = sorted(set(carried) & set(model_names))
        if clash:
            side.close()
            raise ConversionError(f"{mtp}: tensor {clash[0]!r} is also a model tensor; the side file is not ours")
        try:
            for n in carried:
                side.dtype(n)
        except ValueError as e:
            side.close()
            raise ConversionError(str(e)) from None
    cfg_path = os.path.join(extra_dir, HF_CONFIG_EXTRA)
    if os.path.exists(cfg_path):
        try:
            with open(cfg_path) as f:
                extra_cfg = json.load(f)
            if not isinstance(extra_cfg, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise ConversionError(f"{cfg_path}: {e}") from None
    return side, carried, extra_cfg


def convert_nemo_to_hf(nemo_dir: str, output: str, overwrite: bool = False, progress: bool = True,
                       max_shard_size: str = "5GB") -> ConversionReport:
    """NeMo 2 Qwen3-Next checkpoint (`weights/` + `context/`) -> HF directory."""
    from .model import read_context

    nemo_dir = os.fspath(nemo_dir)
    weights = os.path.join(nemo_dir, "weights")
    if not os.path.isdir(weights) or not os.path.isdir(os.path.join(nemo_dir, "context")):
        raise ConversionError(f"{nemo_dir} is not a NeMo 2 checkpoint (needs weights/ and context/)")
    config, tokenizer_dir = read_context(os.path.join(nemo_dir, "context"))
    with atomic_output_dir(output, overwrite) as tmp:
        report = dist_checkpoint_to_hf(weights, config, tmp, parse_size(max_shard_size), progress,
                                       extra_dir=os.path.join(nemo_dir, EXTRA_DIR))
        if tokenizer_dir:
            for fn in os.listdir(tokenizer_dir):
                if fn in TOKENIZER_FILES:
                    shutil.copy(os.path.join(tokenizer_dir, fn), os.path.join(tmp, fn))
    report.output = os.path.abspath(output)
    return report


def parse_size(s) -> int:
    if isinstance(s, int):
        return s
    s = str(s).strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)
