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

It also remembers one failed JIT build: megatron-core 0.15 compiles a CUDA managed-memory allocator with
`load_inline` while `import megatron.core` runs (`megatron.core.inference.unified_memory`, used only by its
dynamic inference engine, which we do not use). Where that build fails it costs ~12 s in every process
(measured on the H200 machine: 12.2 s of a 27.7 s import). `skip_failed_unified_memory_build` records the
failure once per machine and megatron-core/torch version (``unified_memory_failed-<versions>`` in the cache
directory) and lets later processes load a module that says it is unavailable instead; delete the file
to retry. megatron-core >= 0.16 compiles that allocator lazily and is left alone.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import sys
import types
from importlib.abc import MetaPathFinder
from importlib.machinery import PathFinder
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
    unified = skip_failed_unified_memory_build(directory)
    return dict(dir=directory, key=key, fields=fields, dirs=dirs, user_set=user_set, entries=entries,
                warm=entries["TILELANG_CACHE_DIR"] + entries["TRITON_CACHE_DIR"] > 0, unified_memory=unified)


UNIFIED_MEMORY = "megatron.core.inference.unified_memory"


def _unified_memory_marker(directory: str) -> str:
    tag = "-".join(v or "none" for v in (_version(("megatron-core", "megatron_core")), _version(("torch",))))
    return os.path.join(directory, f"unified_memory_failed-{tag}")


class _RecordUnifiedMemoryOutcome(MetaPathFinder):
    """Finds megatron-core's unified_memory module as usual; after it ran, writes the marker if its
    eager build failed (0.15: ``has_unified_memory`` is False)."""

    def __init__(self, marker: str):
        self.marker = marker

    def find_spec(self, fullname, path=None, target=None):
        if fullname != UNIFIED_MEMORY:
            return None
        spec = PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader, marker = spec.loader, self.marker

        class _Loader:
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                if getattr(module, "has_unified_memory", None) is False:
                    try:
                        with open(marker, "w") as f:
                            f.write("megatron-core's unified-memory allocator failed to build here; delete to retry\n")
                    except OSError:
                        pass

        spec.loader = _Loader()
        return spec


def _unavailable_unified_memory() -> types.ModuleType:
    mod = types.ModuleType(UNIFIED_MEMORY)
    mod.__doc__ = "Stand-in: the managed-memory allocator failed to build on this machine (nemo_qwen3_next.kernel_cache)."
    mod.has_unified_memory = False
    mod._alloc = None

    def create_unified_mempool():
        raise RuntimeError("megatron-core's unified-memory allocator failed to build on this machine; delete "
                           "the unified_memory_failed-* file in the kernel cache directory to retry the build.")

    mod.create_unified_mempool = create_unified_mempool
    return mod


def skip_failed_unified_memory_build(directory: str) -> str:
    """Before megatron-core is imported: 'skipped' (the build failed here before: a stand-in module is
    loaded), 'watching' (the first import records a failure) or 'n/a' (megatron-core already imported)."""
    if UNIFIED_MEMORY in sys.modules or "megatron.core" in sys.modules:
        return "n/a"
    marker = _unified_memory_marker(directory)
    if os.path.exists(marker):
        sys.modules[UNIFIED_MEMORY] = _unavailable_unified_memory()
        return "skipped"
    if not any(isinstance(f, _RecordUnifiedMemoryOutcome) for f in sys.meta_path):
        sys.meta_path.insert(0, _RecordUnifiedMemoryOutcome(marker))
    return "watching"


def describe(info: dict) -> str:
    """One log line: where the cache is, warm or cold, and which variables the user set."""
    n = info["entries"]
    state = (f"warm: {n['TILELANG_CACHE_DIR']} TileLang kernels, {n['TRITON_CACHE_DIR']} Triton entries"
             if info["warm"] else "cold: kernels compile on first use and are kept here")
    line = f"kernel cache: {info['dir']} ({state})"
    if info.get("unified_memory") == "skipped":
        line += "; megatron-core's unified-memory build skipped (it failed here before)"
    if info["user_set"]:
        line += "; kept from the environment: " + ", ".join(f"{v}={info['dirs'][v]}" for v in info["user_set"])
    return line
