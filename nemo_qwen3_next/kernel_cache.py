"""One on-disk cache per machine for the JIT-compiled GPU kernels (TileLang, Triton, torch.compile).

FlashQLA's and fla's kernels compile on first use (TileLang: 2-35 s each, ~100 s for a new head
layout), and every new process would repeat that unless the libraries find their earlier output.
`configure_kernel_cache()` points each library's own cache variable at one directory,

    $QWEN3_NEXT_KERNEL_CACHE/<key>   or   ~/.cache/nemo_qwen3_next/kernels/<key>

where ``<key>`` names the GPU and hashes every version that changes the generated code (torch,
CUDA, triton, tilelang, tvm-ffi, fla, flash-qla, Python), so an upgrade or another GPU starts a
fresh directory instead of trusting stale binaries. It only sets variables the user has not set.
What each library reads (checked in their sources; docs/performance.md#kernel-cache):

* ``TILELANG_CACHE_DIR``: TileLang 0.1.15's `KernelCache`, used by both `tilelang.jit` (FlashQLA's
  kernels) and `tilelang.compile`; read from the environment at every compile; autotune results too.
* ``TRITON_CACHE_DIR``: Triton's compiled kernels, and fla's autotune choices (`cache_results`).
* ``TVM_FFI_CACHE_DIR``: tvm-ffi's torch DLPack addon, built once when the prebuilt one does not fit.
* ``TORCHINDUCTOR_CACHE_DIR``: torch.compile (Megatron's fused glue).

Call it before the first kernel compiles (the entry points do so first thing); it imports only torch.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import sys
from typing import Dict, Optional

# environment variable -> sub-directory of the keyed cache
CACHE_VARS = {
    "TILELANG_CACHE_DIR": "tilelang",
    "TRITON_CACHE_DIR": "triton",
    "TVM_FFI_CACHE_DIR": "tvm-ffi",
    "TORCHINDUCTOR_CACHE_DIR": "inductor",
}
# distributions whose version changes generated kernels (first installed name wins)
VERSIONED = {
    "torch": ("torch",),
    "triton": ("triton", "pytorch-triton"),
    "tilelang": ("tilelang",),
    "tvm-ffi": ("apache-tvm-ffi",),
    "fla": ("fla-core", "flash-linear-attention"),
    "flash-qla": ("flash-qla", "flash_qla"),
}


def _version(names) -> Optional[str]:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _gpu() -> Optional[str]:
    """'<name>-sm<major><minor>' of this process's GPU (LOCAL_RANK under torchrun), None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    props = torch.cuda.get_device_properties(index)
    return f"{props.name}-sm{props.major}{props.minor}"


def key_fields() -> Dict[str, Optional[str]]:
    """Everything the cache key covers: package versions, CUDA, Python and the GPU."""
    import torch

    fields = {name: _version(dists) for name, dists in VERSIONED.items()}
    fields.update(cuda=torch.version.cuda, python=f"{sys.version_info.major}.{sys.version_info.minor}", gpu=_gpu())
    return fields


def cache_key(fields: Dict[str, Optional[str]]) -> str:
    """Readable GPU name + a hash of all fields: any version change gives a new key."""
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    gpu = "".join(c if c.isalnum() or c in "-." else "_" for c in (fields.get("gpu") or "cpu"))
    return f"{gpu}-{digest}"


def cache_root() -> str:
    root = os.environ.get("QWEN3_NEXT_KERNEL_CACHE")
    if root:
        return os.path.abspath(os.path.expanduser(root))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "nemo_qwen3_next", "kernels")


def count_entries(dirs: Dict[str, str]) -> Dict[str, int]:
    """Compiled entries per library: TileLang kernels (<dir>/<version>/<platform>/kernels/<hash>),
    Triton kernel/autotune directories (<dir>/<hash>), Inductor and tvm-ffi files."""
    def listed(path):
        try:
            return [e for e in os.scandir(path) if not e.name.startswith(".")]
        except OSError:
            return []

    out = {}
    for var, path in dirs.items():
        if var == "TILELANG_CACHE_DIR":
            out[var] = sum(len(listed(os.path.join(v.path, p.name, "kernels")))
                           for v in listed(path) for p in listed(v.path))
        elif var == "TRITON_CACHE_DIR":
            out[var] = len(listed(path))
        else:
            out[var] = sum(len(files) for _, _, files in os.walk(path))
    return out


def configure_kernel_cache(fields: Optional[Dict[str, Optional[str]]] = None) -> dict:
    """Set the libraries' cache variables (only those not already set) to the keyed directory.

    Returns {"dir", "key", "fields", "dirs": {var: path}, "user_set": [vars left alone],
    "entries": {var: count}, "warm": bool}; `describe()` turns it into the log line."""
    fields = key_fields() if fields is None else fields
    key = cache_key(fields)
    directory = os.path.join(cache_root(), key)
    dirs, user_set = {}, []
    for var, sub in CACHE_VARS.items():
        if os.environ.get(var):
            user_set.append(var)
        else:
            os.environ[var] = os.path.join(directory, sub)
        dirs[var] = os.environ[var]
    try:
        os.makedirs(directory, exist_ok=True)
        for var, sub in CACHE_VARS.items():
            if var not in user_set:
                os.makedirs(dirs[var], exist_ok=True)
        key_file = os.path.join(directory, "key.json")
        if not os.path.exists(key_file):  # what this directory is for, for a human clearing caches
            with open(key_file + f".tmp{os.getpid()}", "w") as f:
                json.dump(fields, f, indent=1, sort_keys=True)
            os.replace(key_file + f".tmp{os.getpid()}", key_file)
    except OSError:  # read-only home: the libraries fall back to compiling; say so in the log line
        pass
    entries = count_entries(dirs)
    return dict(dir=directory, key=key, fields=fields, dirs=dirs, user_set=user_set, entries=entries,
                warm=entries["TILELANG_CACHE_DIR"] + entries["TRITON_CACHE_DIR"] > 0)


def describe(info: dict) -> str:
    """One log line: where the cache is, warm or cold, and which variables the user set."""
    n = info["entries"]
    state = (f"warm: {n['TILELANG_CACHE_DIR']} TileLang kernels, {n['TRITON_CACHE_DIR']} Triton entries"
             if info["warm"] else "cold: kernels compile on first use and are kept here")
    line = f"kernel cache: {info['dir']} ({state})"
    if info["user_set"]:
        line += "; kept from the environment: " + ", ".join(f"{v}={info['dirs'][v]}" for v in info["user_set"])
    return line
