"""The one safetensors reader and writer: headers validated before any tensor is read.

`SafetensorsFile` checks a file from its header alone (length, JSON, dtypes, shapes, offsets that
tile the data, file size), so a cut-off download or a corrupt file fails by name before work
starts. Tensors are read with plain reads (safetensors' mmap would count every touched page in
RSS), one at a time, each checked for NaN/inf unless the caller opts out. `SafetensorsCheckpoint`
is a Hugging Face directory: the index (or the files), every file checked, name -> file.
Stdlib-only at import time; torch is imported when a tensor is read or written.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .errors import CheckpointError, check_values, read_json_object

# safetensors dtype -> (torch dtype name, bytes per element)
ST_DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "BF16": ("bfloat16", 2), "F16": ("float16", 2),
             "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1), "I64": ("int64", 8),
             "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1), "BOOL": ("bool", 1)}
FLOAT_ST_DTYPES = ("F64", "F32", "BF16", "F16", "F8_E4M3", "F8_E5M2")
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


def _torch_dtype(st: str):
    import torch

    return getattr(torch, ST_DTYPES[st][0])


def _st_dtype(dtype) -> str:
    for st, (name, _) in ST_DTYPES.items():
        if str(dtype) == f"torch.{name}":
            return st
    raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors; convert the tensor first")


class SafetensorsFile:
    """One safetensors file, validated from its header; `get` reads one tensor with plain reads."""

    def __init__(self, path: str, allow_non_finite: bool = False):
        self.path, self.allow_non_finite = os.fspath(path), allow_non_finite
        self.header, self.data_start = self._read_header()
        self._f = None

    def _bad(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path} is not a valid safetensors file ({why}); re-download or re-save it")

    def _read_header(self) -> Tuple[Dict[str, dict], int]:
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path} does not exist; the checkpoint is incomplete")
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise self._bad(f"{size} bytes, shorter than the 8-byte header length")
            n = struct.unpack("<Q", head)[0]
            if n > min(size - 8, _MAX_HEADER):
                raise self._bad(f"header length {n} exceeds the file size {size}: truncated or corrupt")
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise self._bad(f"header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        header.pop("__metadata__", None)
        spans = []
        for name, h in header.items():
            if not (isinstance(h, dict) and h.get("dtype") in ST_DTYPES and isinstance(h.get("shape"), list)
                    and all(isinstance(d, int) and d >= 0 for d in h["shape"])
                    and isinstance(h.get("data_offsets"), list) and len(h["data_offsets"]) == 2
                    and all(isinstance(o, int) for o in h["data_offsets"])):
                raise self._bad(f"tensor {name!r} has a malformed entry {json.dumps(h)[:120]} (dtype must be one "
                                f"of {', '.join(ST_DTYPES)})")
            begin, end = h["data_offsets"]
            numel = 1
            for d in h["shape"]:
                numel *= d
            if not 0 <= begin <= end or end - begin != numel * ST_DTYPES[h["dtype"]][1]:
                raise self._bad(f"tensor {name!r}: data_offsets {h['data_offsets']} do not hold "
                                f"{h['dtype']} {h['shape']}")
            spans.append((begin, end, name))
        spans.sort()
        for (b0, e0, a), (b1, e1, b) in zip(spans, spans[1:]):
            if b1 < e0:
                raise self._bad(f"tensors {a!r} and {b!r} overlap")
        end = spans[-1][1] if spans else 0
        if size < 8 + n + end:
            raise CheckpointError(f"{self.path} is truncated: its header promises {8 + n + end} bytes, the file "
                                  f"has {size}; re-download or re-save it")
        return header, 8 + n

    def keys(self) -> Iterable[str]:
        return self.header.keys()

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def st_dtype(self, name: str) -> str:
        return self.header[name]["dtype"]

    def dtype(self, name: str):
        return _torch_dtype(self.header[name]["dtype"])

    def nbytes(self, name: str) -> int:
        begin, end = self.header[name]["data_offsets"]
        return end - begin

    def get(self, name: str):
        """The tensor `name`, read into fresh memory and checked for NaN/inf (unless opted out)."""
        import torch

        h = self.header[name]
        begin, end = h["data_offsets"]
        t = torch.empty(h["shape"], dtype=_torch_dtype(h["dtype"]))
        if self._f is None:
            self._f = open(self.path, "rb")
        self._f.seek(self.data_start + begin)
        if t.numel() and self._f.readinto(t.view(-1).view(torch.uint8).numpy()) != end - begin:
            raise CheckpointError(f"{self.path}: tensor {name!r} is cut short (file truncated while reading?)")
        check_values(name, t, self.path, self.allow_non_finite)
        return t

    __getitem__ = get

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class SafetensorsCheckpoint:
    """A Hugging Face directory's weights: index (or files) validated, tensor name -> file.

    Checked at construction, from headers only: the index parses and every file it names exists
    and holds exactly the tensors it lists; without an index, no tensor is in two files.
    `float_only` refuses integer/bool tensors (weights are floating point; an integer tensor
    means a broken export). Keeps one file handle open at a time."""

    def __init__(self, path: str, allow_non_finite: bool = False, float_only: bool = True):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path} is not a directory; give a Hugging Face model directory")
        index_path = os.path.join(self.path, INDEX_FILE)
        self.files: Dict[str, SafetensorsFile] = {}
        self.index: Dict[str, str] = {}
        if os.path.exists(index_path):
            weight_map = _read_index(index_path)
            for fn in sorted(set(weight_map.values())):
                self.files[fn] = SafetensorsFile(os.path.join(self.path, fn), allow_non_finite)
            for name, fn in weight_map.items():
                if name not in self.files[fn].header:
                    raise CheckpointError(f"{self.files[fn].path} lacks tensor {name!r} that {INDEX_FILE} lists; "
                                          f"the index and the files disagree")
            for fn, f in self.files.items():
                stray = sorted(set(f.keys()) - {n for n, v in weight_map.items() if v == fn})
                if stray:
                    raise CheckpointError(f"{f.path} holds tensor {stray[0]!r} that {INDEX_FILE} does not list "
                                          f"(or lists in another file); the index is stale")
            self.index = dict(weight_map)
        else:
            found = sorted(glob.glob(os.path.join(self.path, "*.safetensors")))
            if not found:
                raise CheckpointError(f"{self.path}: no *.safetensors files and no {INDEX_FILE}")
            for p in found:
                fn = os.path.basename(p)
                self.files[fn] = f = SafetensorsFile(p, allow_non_finite)
                for name in f.keys():
                    if name in self.index:
                        raise CheckpointError(f"tensor {name!r} is in both {self.index[name]} and {fn} under "
                                              f"{self.path}; remove the stale file")
                    self.index[name] = fn
        if float_only:
            for name, fn in self.index.items():
                st = self.files[fn].st_dtype(name)
                if st not in FLOAT_ST_DTYPES:
                    raise CheckpointError(f"tensor {name!r} in {self.files[fn].path} has dtype {st}; weights must be "
                                          f"floating point (F32/BF16/F16): the checkpoint is broken")
        self._open: Optional[SafetensorsFile] = None

    def keys(self) -> Iterable[str]:
        return self.index.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def file(self, name: str) -> SafetensorsFile:
        """The file holding `name` (the previously used file's handle is closed first)."""
        fn = self.index.get(name)
        if fn is None:
            raise CheckpointError(f"checkpoint tensor {name!r} is missing from {self.path}")
        f = self.files[fn]
        if self._open is not f:
            if self._open is not None:
                self._open.close()
            self._open = f
        return f

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.file(name).shape(name)

    def dtype(self, name: str):
        return self.file(name).dtype(name)

    def __getitem__(self, name: str):
        return self.file(name).get(name)

    def close(self) -> None:
        if self._open is not None:
            self._open.close()
            self._open = None


def _read_index(index_path: str) -> Dict[str, str]:
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weight_map.items()):
            raise ValueError("weight_map must map tensor names to file names")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path} is not a valid safetensors index ({type(e).__name__}: {e}); "
                              f"re-download it or delete it to use the *.safetensors files directly") from None
    for fn in set(weight_map.values()):
        if os.path.isabs(fn) or ".." in fn.split("/") or not fn.endswith(".safetensors"):
            raise CheckpointError(f"{index_path} names file {fn!r}; only *.safetensors files in the directory")
        if not os.path.isfile(os.path.join(os.path.dirname(index_path), fn)):
            raise CheckpointError(f"{os.path.join(os.path.dirname(index_path), fn)} is listed in {INDEX_FILE} but "
                                  f"does not exist; the download is incomplete")
    return weight_map


class SafetensorsStreamWriter:
    """Write one safetensors file tensor by tensor: the header (all names/shapes) goes first."""

    def __init__(self, path: str, layout: List[Tuple[str, object, Tuple[int, ...]]],
                 metadata: Optional[Dict[str, str]] = None):
        header, offset = {}, 0
        self.expected = []
        for name, dtype, shape in layout:
            st = _st_dtype(dtype)
            numel = 1
            for d in shape:
                numel *= int(d)
            n = numel * ST_DTYPES[st][1]
            header[name] = {"dtype": st, "shape": list(shape), "data_offsets": [offset, offset + n]}
            self.expected.append((name, dtype, tuple(shape)))
            offset += n
        header["__metadata__"] = metadata or {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path, self.nbytes = path, offset
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor) -> None:
        import torch

        exp_name, dtype, shape = self.expected[self._next]
        if name != exp_name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: expected {exp_name} {dtype} {shape}, got {name} {tensor.dtype} "
                             f"{tuple(tensor.shape)}")
        t = tensor.detach().contiguous().cpu()
        self._f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        self._f.close()
        if self._next != len(self.expected):
            raise ValueError(f"{self.path}: {len(self.expected) - self._next} tensors were never written")


def copy_safetensors_tensors(names: Sequence[str], source, path: str, on_item=None) -> int:
    """Copy tensors `names` of `source` (a `SafetensorsCheckpoint` or `SafetensorsFile`) unchanged
    (names, dtypes, bytes) into a new safetensors file `path`, one tensor in memory at a time.
    Returns the bytes written."""
    layout = [(n, source.dtype(n), source.shape(n)) for n in names]
    writer = SafetensorsStreamWriter(path, layout)
    try:
        for n in names:
            t = source[n]
            writer.write(n, t)
            if on_item:
                on_item(t.numel() * t.element_size())
            del t
    except BaseException:
        writer._f.close()  # the caller's temporary output directory is removed
        raise
    writer.close()
    return writer.nbytes


def check_hf_dir(hf_dir: str) -> dict:
    """The config.json of a HF Qwen3-Next directory, after checking it is one (cheap: JSON and
    safetensors headers only, no torch), so a CLI refuses a wrong input in well under a second."""
    hf_dir = os.fspath(hf_dir)
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"{hf_dir} is not a directory; the input must be a Hugging Face model directory")
    path = os.path.join(hf_dir, "config.json")
    cfg = read_json_object(path, "the input must be a Hugging Face model directory")
    if cfg.get("model_type", "qwen3_next") != "qwen3_next":
        raise CheckpointError(f"{path}: model_type = {cfg['model_type']!r}: this is not a Qwen3-Next checkpoint "
                              f"(expected 'qwen3_next')")
    SafetensorsCheckpoint(hf_dir)
    return cfg


def parse_size(s) -> int:
    """'5GB' / '200KB' / '1000' -> bytes (> 0); `CheckpointError` naming the value otherwise."""
    text = str(s).strip().upper()
    try:
        for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
            if text.endswith(unit):
                n = int(float(text[: -len(unit)]) * mult)
                break
        else:
            n = int(text)
    except (ValueError, OverflowError):
        n = 0
    if n <= 0:
        raise CheckpointError(f"max_shard_size = {s!r} is not a positive size; use e.g. 5GB, 500MB or 200KB")
    return n
