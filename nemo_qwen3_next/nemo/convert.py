"""Streaming, validated, atomic HF <-> NeMo 2 checkpoint conversion for Qwen3-Next.

Memory: nothing ever holds the model. The target model is built on the *meta* device only to
learn its tensors (names, shapes, distributed-checkpoint keys and offsets); then each tensor is
read from the source, converted with the core's mapping table (`hf_mapping.weight_plan`, the
only mapping there is), written, and dropped. Peak RSS ~ baseline + the largest tensor (+ its
inputs for the few tensors that concatenate two HF tensors).

Validation happens *before* anything is written, from file headers only: config.json parses and
is valid, every safetensors file is complete, every HF tensor is either consumed or explicitly
carried/skipped (``mtp.*`` multi-token-prediction weights map into the model's MTP block when
config.json has ``num_nextn_predict_layers: 1``, else they are carried unchanged in a side file, see
below; a tied ``lm_head.weight`` is skipped), and every HF tensor has exactly the shape the
config implies. Output goes to a temporary directory beside the target, renamed into place at the end;
on any error it is removed, so a failed conversion leaves nothing behind.

NeMo checkpoint layout (what `llm.import_ckpt` writes): ``<dir>/weights`` = Megatron ``torch_dist``
distributed checkpoint with keys ``module.<GPTModel state-dict name>`` (loads at any TP/PP/EP),
``<dir>/context`` = NeMo's serialised `Qwen3NextModel` (config + tokenizer), and ``<dir>/extra``
(written by this converter; the model never reads it): ``hf_config.json`` = the input config.json
(e.g. ``bos_token_id``), and only for a checkpoint whose config.json names no MTP layer (or one
converted before the MTP block existed) ``mtp.safetensors`` = its ``mtp.*`` tensors byte for byte.
Export writes both back, so an HF -> NeMo -> HF round trip keeps them. With
``num_nextn_predict_layers: 1`` the ``mtp.*`` tensors are ordinary model tensors (``mtp.layers.0.*`` in
``weights/``, see `modules/mtp.py`), TP/PP/EP-independent like the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from ..checkpoint import (CheckpointError, SafetensorsCheckpoint, SafetensorsFile, SafetensorsStreamWriter,
                          atomic_output_dir, check_hf_dir, check_nemo_dir, check_values, copy_safetensors_tensors,
                          parse_size, read_json_object)
from ..checkpoint.cli import console
from ..config import ConfigError, Qwen3NextConfig
from ..hf_mapping import weight_plan
from ..loading import check_hf_names
from ..model import build_model, init_single_process
from .context import TOKENIZER_FILES, copy_files, non_weight_files, read_context, write_context
from .streaming import (NEMO_SHARDED_METADATA, PREFIX, DistCheckpointReader, save_dist_checkpoint_streaming)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "bfloat16": torch.bfloat16, "float32": torch.float32}
EXTRA_DIR = "extra"  # <nemo_dir>/extra: what the NeMo model does not use but an HF export needs back
MTP_FILE = "mtp.safetensors"  # HF `mtp.*` tensors, unchanged
HF_CONFIG_EXTRA = "hf_config.json"  # the input config.json as it was (older checkpoints: only fields
# `Qwen3NextConfig.to_hf_dict` lacks); export starts from it, so keys, values and order come back
HF_FILES_DIR = "files"  # extra/files: the input's non-weight files (generation_config.json, README ...)
_DTYPE_KEYS = ("torch_dtype", "dtype")  # export writes the dtype the checkpoint holds


class ConversionError(CheckpointError):
    """The input cannot be converted; the message names the file / tensor / field and the fix."""


@contextmanager
def _conversion_errors():
    """Every refusal surfaces as one `ConversionError` (config and checkpoint errors alike)."""
    try:
        yield
    except ConversionError:
        raise
    except (CheckpointError, ConfigError) as e:
        raise ConversionError(str(e)) from None


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


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True,
                file=console())


# ---------------------------------------------------------------------- the target model's tensors
def _read_hf_config(hf_dir: str) -> dict:
    with _conversion_errors():
        return check_hf_dir(hf_dir)


def core_config_from_hf_dir(hf_dir: str, dtype: torch.dtype) -> Qwen3NextConfig:
    path = os.path.join(hf_dir, "config.json")
    with _conversion_errors():
        try:
            cfg = Qwen3NextConfig.from_hf(_read_hf_config(hf_dir), **_dtype_kw(dtype))
        except ConfigError as e:
            raise ConversionError(f"{path}: {e}") from None
    return cfg  # num_nextn_predict_layers -> mtp_num_layers: `mtp.*` map into the MTP block


def _dtype_kw(dtype):
    return dict(params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                use_cpu_initialization=True, perform_initialization=False)


def meta_model(config: Qwen3NextConfig):
    """The TP=1 Megatron `GPTModel` on the meta device (shapes and checkpoint layout, no memory).
    Per-expert parameters even under `moe_stacked_experts`: the stored checkpoint layout is the same."""
    init_single_process()
    with torch.device("meta"):
        return build_model(config.replace(moe_stacked_experts=False), backend="local")


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
def validate_hf(reader: SafetensorsCheckpoint, config: Qwen3NextConfig, model) -> Tuple[list, List[str], List[str]]:
    """Names and shapes of the HF checkpoint against `config`; returns (plan, skipped names,
    carried names = the `mtp.*` tensors the model does not use, kept unchanged)."""
    plan = weight_plan(config)
    skipped, carried = check_hf_names(reader.keys(), config, plan)
    params = dict(model.state_dict())
    hf_shapes = {n: reader.shape(n) for n in (n for e in plan for n in e.hf)}
    for e in plan:
        if e.ours not in params:
            raise ConversionError(f"model has no tensor {e.ours!r}; check the config")
        expected = [tuple(t.shape) for t in e.to_hf(params[e.ours])]
        for n, shp in zip(e.hf, expected):
            if hf_shapes[n] != shp:
                raise ConversionError(f"HF tensor {n!r} has shape {hf_shapes[n]}, config.json implies {shp}; "
                                      f"config.json and the weights disagree")
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
                          progress: bool = True, extra_dir: Optional[str] = None, allow_non_finite: bool = False
                          ) -> Tuple[Qwen3NextConfig, ConversionReport]:
    """Validate a HF directory and write its weights as a Megatron distributed checkpoint in
    `weights_dir` (must exist, empty). Megatron + torch only (no NeMo).

    `extra_dir`: where the `mtp.*` tensors go, unchanged (`extra_dir/mtp.safetensors`, streamed one
    tensor at a time); None skips them (listed in the report). NaN/inf weights are refused (the
    tensor and index named) unless `allow_non_finite`."""
    dtype = dtype or _hf_dtype(hf_dir)
    config = core_config_from_hf_dir(hf_dir, dtype)
    with _conversion_errors():
        reader = SafetensorsCheckpoint(hf_dir, allow_non_finite=allow_non_finite)
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
    total += sum(reader.file(n).nbytes(n) for n in carried)
    report = ConversionReport(output=weights_dir, skipped=skipped, carried=carried)
    bar = _progress(total, "hf->nemo", progress)

    def on_item(nbytes):
        report.bytes += nbytes
        if bar:
            bar.update(nbytes)

    t0 = time.perf_counter()
    with _conversion_errors():
        save_dist_checkpoint_streaming(sd, weights_dir, sources, content_metadata=dict(NEMO_SHARDED_METADATA),
                                       on_item=on_item)
        if carried:
            os.makedirs(extra_dir, exist_ok=True)
            report.carried_bytes = copy_safetensors_tensors(carried, reader, os.path.join(extra_dir, MTP_FILE),
                                                            on_item=bar.update if bar else None)
    reader.close()
    report.seconds = time.perf_counter() - t0
    if bar:
        bar.close()
    not_filled = sorted(planned - set(conv.computed))
    if not_filled:
        raise ConversionError(f"model tensor {not_filled[0]!r} was never written")
    report.tensors = len(conv.computed)
    return config, report


def _hf_dtype(hf_dir: str) -> torch.dtype:
    hf = _read_hf_config(hf_dir)
    name = hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"  # transformers >= 4.56 writes "dtype"
    if name not in DTYPES:
        raise ConversionError(f"{os.path.join(hf_dir, 'config.json')}: torch_dtype = {name!r}; pass dtype bf16 or "
                              f"fp32 (--dtype) explicitly")
    return DTYPES[name]


def convert_hf_to_nemo(hf_dir: str, output: str, dtype: Optional[str] = None, overwrite: bool = False,
                       progress: bool = True, allow_non_finite: bool = False) -> ConversionReport:
    """HF Qwen3-Next directory -> NeMo 2 checkpoint directory (`weights/` + `context/` + `extra/`).

    `dtype`: 'bf16' | 'fp32' | None (the checkpoint's `torch_dtype`). NaN/inf weights are refused
    unless `allow_non_finite`. `extra/` keeps the input config.json and non-weight files for export."""
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype = {dtype!r}; use 'bf16' or 'fp32'")
    hf_dir = os.fspath(hf_dir)
    torch_dtype = DTYPES[dtype] if dtype else None
    with _conversion_errors(), atomic_output_dir(output, overwrite) as tmp:
        weights = os.path.join(tmp, "weights")
        os.makedirs(weights)
        extra = os.path.join(tmp, EXTRA_DIR)
        config, report = hf_to_dist_checkpoint(hf_dir, weights, torch_dtype, progress, extra_dir=extra,
                                               allow_non_finite=allow_non_finite)
        os.makedirs(extra, exist_ok=True)
        shutil.copy2(os.path.join(hf_dir, "config.json"), os.path.join(extra, HF_CONFIG_EXTRA))
        copy_files(hf_dir, non_weight_files(hf_dir), os.path.join(extra, HF_FILES_DIR))
        write_context(config, hf_dir, os.path.join(tmp, "context"))
    report.output = os.path.abspath(output)
    return report


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
                          extra_dir: Optional[str] = None, allow_non_finite: bool = False) -> ConversionReport:
    """Stream a Megatron distributed checkpoint of Qwen3-Next into HF safetensors shards + index.

    `extra_dir` (a NeMo checkpoint's `extra/`, may be absent): its `mtp.safetensors` tensors are
    written back unchanged after the model's, and config.json starts from its `hf_config.json`
    (see `export_hf_config`). NaN/inf weights are refused unless `allow_non_finite`."""
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
        check_values(e.ours, full, weights_dir, allow_non_finite)
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
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(export_hf_config(config, extra_cfg), f, indent=2)
    return report


def export_hf_config(config: Qwen3NextConfig, source: dict) -> dict:
    """config.json for `config`, faithful to the imported one (`source`, {} if unknown): its keys,
    values and order, with the dtype under the key it used. A value is replaced only where it would
    read back as a different architecture than `config` (e.g. a stale side file)."""
    ours = config.to_hf_dict()
    dtype_name = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}[config.params_dtype]
    out = dict(source) if source else dict(ours)
    for key in [k for k in _DTYPE_KEYS if k in out] or ["torch_dtype"]:
        out[key] = dtype_name
    try:
        reread = Qwen3NextConfig.from_hf(out).to_hf_dict()
    except (ConfigError, KeyError, ValueError, TypeError):
        reread = {}
    for k, v in ours.items():  # an absent key that reads back as ours stays absent (HF's default)
        if reread.get(k) != v:
            out[k] = v
    return out


def _open_extra(extra_dir: Optional[str], model_names) -> Tuple[Optional[SafetensorsFile], List[str], dict]:
    """(reader of extra/mtp.safetensors or None, its tensor names, the imported config.json)."""
    side, carried, extra_cfg = None, [], {}
    if not extra_dir:
        return side, carried, extra_cfg
    mtp = os.path.join(extra_dir, MTP_FILE)
    if os.path.exists(mtp):
        side = SafetensorsFile(mtp)
        carried = sorted(side.keys())
        clash = sorted(set(carried) & set(model_names))
        if clash:
            raise ConversionError(f"{mtp}: tensor {clash[0]!r} is also a model tensor; the side file is not ours")
    cfg_path = os.path.join(extra_dir, HF_CONFIG_EXTRA)
    if os.path.exists(cfg_path):
        extra_cfg = read_json_object(cfg_path, "delete it or convert the checkpoint again")
    return side, carried, extra_cfg


def convert_nemo_to_hf(nemo_dir: str, output: str, overwrite: bool = False, progress: bool = True,
                       max_shard_size: str = "5GB", allow_non_finite: bool = False) -> ConversionReport:
    """NeMo 2 Qwen3-Next checkpoint (`weights/` + `context/`) -> HF directory.

    The checkpoint is checked for completeness first (every file, every stored chunk inside its
    file); the imported config.json and non-weight files kept in `extra/` come back unchanged."""
    nemo_dir = os.fspath(nemo_dir)
    weights = os.path.join(nemo_dir, "weights")
    with _conversion_errors():
        shard_bytes = parse_size(max_shard_size)
        check_nemo_dir(nemo_dir, deep=True)
        config, tokenizer_dir = read_context(os.path.join(nemo_dir, "context"))
        extra = os.path.join(nemo_dir, EXTRA_DIR)
        with atomic_output_dir(output, overwrite) as tmp:
            report = dist_checkpoint_to_hf(weights, config, tmp, shard_bytes, progress, extra_dir=extra,
                                           allow_non_finite=allow_non_finite)
            files = os.path.join(extra, HF_FILES_DIR)
            if os.path.isdir(files):
                copy_files(files, sorted(os.listdir(files)), tmp)
            if tokenizer_dir:  # checkpoints written before extra/files existed
                copy_files(tokenizer_dir, [fn for fn in os.listdir(tokenizer_dir) if fn in TOKENIZER_FILES
                                           and not os.path.exists(os.path.join(tmp, fn))], tmp)
    report.output = os.path.abspath(output)
    return report
