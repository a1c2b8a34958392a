"""The per-machine kernel cache: which variables it sets, that it leaves the user's alone, that the
key changes with every version that changes generated code, and how it tells warm from cold."""

import os

import pytest

from nemo_qwen3_next import kernel_cache as kc

FIELDS = {"torch": "2.11.0", "triton": "3.5.1", "tilelang": "0.1.15", "tvm-ffi": "0.1.12", "fla": "0.6.0",
          "flash-qla": "0.1.3", "cuda": "12.8", "python": "3.12", "gpu": "NVIDIA H200-sm90"}


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for var in [*kc.CACHE_VARS, "QWEN3_NEXT_KERNEL_CACHE", "XDG_CACHE_HOME"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def test_sets_every_library_variable_under_the_keyed_dir(clean_env, tmp_path):
    clean_env.setenv("QWEN3_NEXT_KERNEL_CACHE", str(tmp_path / "kc"))
    info = kc.configure_kernel_cache(FIELDS)
    expected = tmp_path / "kc" / kc.cache_key(FIELDS)
    assert info["dir"] == str(expected)
    assert os.environ["TILELANG_CACHE_DIR"] == str(expected / "tilelang")
    assert os.environ["TRITON_CACHE_DIR"] == str(expected / "triton")
    assert os.environ["TVM_FFI_CACHE_DIR"] == str(expected / "tvm-ffi")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(expected / "inductor")
    assert (expected / "tilelang").is_dir() and (expected / "key.json").is_file()
    assert info["user_set"] == [] and not info["warm"]
    assert "cold" in kc.describe(info)


def test_default_root_is_the_user_cache_dir(clean_env, tmp_path):
    info = kc.configure_kernel_cache(FIELDS)
    assert info["dir"] == str(tmp_path / "home" / ".cache" / "nemo_qwen3_next" / "kernels" / kc.cache_key(FIELDS))


def test_user_set_variables_are_not_overridden(clean_env, tmp_path):
    clean_env.setenv("QWEN3_NEXT_KERNEL_CACHE", str(tmp_path / "kc"))
    clean_env.setenv("TILELANG_CACHE_DIR", "/my/tl")
    info = kc.configure_kernel_cache(FIELDS)
    assert os.environ["TILELANG_CACHE_DIR"] == "/my/tl"
    assert os.environ["TRITON_CACHE_DIR"].startswith(str(tmp_path / "kc"))
    assert info["user_set"] == ["TILELANG_CACHE_DIR"]
    assert "TILELANG_CACHE_DIR=/my/tl" in kc.describe(info)


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_key_changes_with_every_field(field):
    changed = dict(FIELDS, **{field: FIELDS[field] + "x"})
    assert kc.cache_key(changed) != kc.cache_key(FIELDS)
    assert kc.cache_key(dict(FIELDS)) == kc.cache_key(FIELDS)  # stable across calls (and processes: no salt)


def test_key_names_the_gpu():
    assert kc.cache_key(FIELDS).startswith("NVIDIA_H200-sm90-")
    assert kc.cache_key(dict(FIELDS, gpu=None)).startswith("cpu-")


def test_real_fields_cover_installed_versions():
    import torch

    fields = kc.key_fields()
    assert fields["torch"] == torch.__version__ and fields["cuda"] == torch.version.cuda
    assert set(kc.VERSIONED) <= set(fields) and {"cuda", "python", "gpu"} <= set(fields)


def test_warm_when_tilelang_or_triton_left_entries(clean_env, tmp_path):
    clean_env.setenv("QWEN3_NEXT_KERNEL_CACHE", str(tmp_path / "kc"))
    info = kc.configure_kernel_cache(FIELDS)
    # TileLang 0.1.15's layout: <TILELANG_CACHE_DIR>/<version>/<platform>-<machine>/kernels/<sha256>/
    (tmp_path / "kc" / info["key"] / "tilelang" / "0.1.15" / "linux-x86_64" / "kernels" / "ab12").mkdir(parents=True)
    (tmp_path / "kc" / info["key"] / "triton" / "CDEF").mkdir(parents=True)
    (tmp_path / "kc" / info["key"] / "triton" / "GHIJ").mkdir(parents=True)
    for var in kc.CACHE_VARS:
        clean_env.delenv(var)
    again = kc.configure_kernel_cache(FIELDS)
    assert again["warm"] and again["entries"]["TILELANG_CACHE_DIR"] == 1 and again["entries"]["TRITON_CACHE_DIR"] == 2
    assert "warm: 1 TileLang kernels, 2 Triton entries" in kc.describe(again)


_UM_PROBE = """
import sys
from nemo_qwen3_next.kernel_cache import skip_failed_unified_memory_build
state = skip_failed_unified_memory_build(sys.argv[1])
import megatron.core.models.gpt  # noqa: F401  imports megatron.core.inference.unified_memory
import megatron.core.inference.unified_memory as um
print(state, getattr(um, "has_unified_memory", "lazy"), um.__doc__ is not None and "Stand-in" in um.__doc__)
"""


def test_failed_unified_memory_build_is_recorded_then_skipped(tmp_path):
    """megatron-core 0.15 builds its managed-memory allocator at import; where that fails (this CPU
    machine, the H200 machine) the first process records it and the next loads the stand-in."""
    import subprocess
    import sys

    def probe():
        out = subprocess.run([sys.executable, "-c", _UM_PROBE, str(tmp_path)], capture_output=True, text=True,
                             timeout=240)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()

    first = probe()
    if first[1] != "False":  # the build worked here (or megatron-core builds lazily): nothing to skip
        assert not list(tmp_path.glob("unified_memory_failed-*"))
        pytest.skip(f"unified-memory allocator: {first[1]}")
    assert first == ["watching", "False", "False"]  # the real module ran and failed
    assert len(list(tmp_path.glob("unified_memory_failed-*"))) == 1
    assert probe() == ["skipped", "False", "True"]
