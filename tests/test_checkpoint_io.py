"""The checkpoint I/O layer (`nemo_qwen3_next.checkpoint`) against independent references:
safetensors' own loader, transformers' config defaults, real signals and dead processes.
Also: preset names match their parameter counts."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_reader_equals_safetensors_own_loader(tmp_path):
    """Plain-read tensors (every dtype we write, sharded with an index) == `safetensors.torch.load_file`."""
    from safetensors.torch import load_file, save_file

    from nemo_qwen3_next.checkpoint import SafetensorsCheckpoint

    g = torch.Generator().manual_seed(0)
    a = {"x.weight": torch.randn(5, 7, generator=g), "y.bias": torch.randn(3, generator=g).to(torch.bfloat16)}
    b = {"z.weight": torch.randn(2, 2, 4, generator=g).to(torch.float16), "empty": torch.zeros(0, 3)}
    save_file(a, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(b, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in a}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in b})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    reader = SafetensorsCheckpoint(str(tmp_path))
    ref = {**load_file(str(tmp_path / "model-00001-of-00002.safetensors")),
           **load_file(str(tmp_path / "model-00002-of-00002.safetensors"))}
    assert sorted(reader.keys()) == sorted(ref)
    for k, v in ref.items():
        got = reader[k]
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
        assert reader.shape(k) == tuple(v.shape) and reader.dtype(k) == v.dtype
    reader.close()


def test_hf_defaults_are_transformers_defaults():
    """An absent config.json field means what it means to transformers (e.g. head_dim 256, not
    hidden_size / heads; 512 experts)."""
    import inspect

    from transformers import Qwen3NextConfig as HFConfig

    from nemo_qwen3_next.config import HF_DEFAULTS, Qwen3NextConfig

    sig = {k: p.default for k, p in inspect.signature(HFConfig.__init__).parameters.items()
           if p.default is not inspect.Parameter.empty}
    assert {k: v for k, v in HF_DEFAULTS.items() if k in sig} == {k: sig[k] for k in HF_DEFAULTS if k in sig}
    partial = dict(model_type="qwen3_next", vocab_size=256, hidden_size=64, intermediate_size=96,
                   num_hidden_layers=4, num_attention_heads=4, linear_num_key_heads=2, linear_num_value_heads=4,
                   linear_key_head_dim=16, linear_value_head_dim=16, moe_intermediate_size=32, num_experts=8,
                   num_experts_per_tok=2, shared_expert_intermediate_size=32)
    ours = Qwen3NextConfig.from_hf(partial)
    theirs = Qwen3NextConfig.from_hf(HFConfig(**partial).to_dict())  # every field spelled out by transformers
    assert ours.to_hf_dict() == theirs.to_hf_dict()
    assert ours.kv_channels == HFConfig(**partial).head_dim == 256


def test_checkpoint_package_imports_without_torch():
    """What the CLIs use for their checks loads in a fraction of a second: no torch, no megatron."""
    code = ("import sys, nemo_qwen3_next.checkpoint, nemo_qwen3_next.checkpoint.cli; "
            "heavy = [m for m in ('torch', 'megatron', 'nemo') if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_stale_temp_dirs_of_dead_runs_only(tmp_path):
    from nemo_qwen3_next.checkpoint import remove_stale_temp_dirs

    target = tmp_path / "out"
    dead, alive = _dead_pid(), os.getppid()
    for entry in (f".out.tmp-{dead}", f".out.tmp-{alive}", f".other.tmp-{dead}", f".out.old-{dead}"):
        (tmp_path / entry).mkdir()
        (tmp_path / entry / "f").write_text(entry)
    removed = remove_stale_temp_dirs(str(target))
    # the dead run's .old is the previous target (killed between the two renames): restored
    assert (target / "f").read_text() == f".out.old-{dead}"
    assert sorted(os.listdir(tmp_path)) == sorted(["out", f".out.tmp-{alive}", f".other.tmp-{dead}"])
    assert sorted(os.path.basename(p) for p in removed) == sorted([f".out.tmp-{dead}", f".out.old-{dead}"])
    (tmp_path / f".out.old-{dead}").mkdir()  # target present: a leftover .old is just removed
    remove_stale_temp_dirs(str(target))
    assert not (tmp_path / f".out.old-{dead}").exists() and (target / "f").exists()


CHILD = r"""
import os, signal, sys, time
from nemo_qwen3_next.checkpoint import atomic_output_dir
# Ctrl-C as in a terminal: a test runner started in the background (`cmd &`) passes SIGINT ignored to its children
signal.signal(signal.SIGINT, signal.default_int_handler)
with atomic_output_dir(sys.argv[1], overwrite=True) as tmp:
    open(os.path.join(tmp, "partial"), "w").write("x")
    print("ready", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_removes_temp_dir_and_keeps_target(tmp_path, sig):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("previous")
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(target)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                         stderr=subprocess.DEVNULL)
    assert p.stdout.readline().strip() == "ready"
    assert any(e.startswith(".out.tmp-") for e in os.listdir(tmp_path))
    p.send_signal(sig)
    assert p.wait(timeout=30) != 0
    assert os.listdir(tmp_path) == ["out"] and os.listdir(target) == ["old"]


def _count(model_yaml):
    """Parameters of a conf/model preset, built on the meta device."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from nemo_qwen3_next import Qwen3NextConfig, build_model, init_single_process

    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base=None):
        m = OmegaConf.to_container(compose(config_name="qwen3_next_tiny", overrides=[f"model={model_yaml}"]),
                                   resolve=True)["model"]
    m.pop("transformer_layer_spec", None)
    init_single_process()
    with torch.device("meta"):
        model = build_model(Qwen3NextConfig(**m, use_cpu_initialization=True), backend="local")
    return m, sum(p.numel() for p in model.parameters())


def test_conf_model_names_match_their_size():
    """conf/model/<name>_<N>m.yaml has ~N million parameters; the old name of the tiny model is an alias."""
    names = sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "conf", "model")) if re.search(r"_\d+m\.yaml$", f))
    assert "qwen3_next_tiny_2m" in names
    tiny, n = _count("qwen3_next_tiny_2m")
    assert 0.7 * 2e6 <= n <= 1.3 * 2e6, n
    alias, _ = _count("qwen3_next_tiny_5m")
    assert alias == tiny  # backwards-compatible name, same model
    for name in names:
        text = open(os.path.join(ROOT, "conf", "model", name + ".yaml")).read()
        if "defaults:" in text:
            continue  # an alias
        millions = int(re.search(r"_(\d+)m$", name).group(1))
        _, n = _count(name)
        assert 0.7 * millions * 1e6 <= n <= 1.3 * millions * 1e6, (name, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn,
                                   torch.float8_e5m2])
def test_non_finite_check_names_first_bad_index(dtype):
    """The index in the error is numpy's first non-finite position; finite tensors pass."""
    import numpy as np

    from nemo_qwen3_next.checkpoint import CheckpointError, check_values

    t = torch.zeros(3, 5, 2)
    check_values("w", t.to(dtype), "f.safetensors")
    t[2, 4, 1], t[1, 3, 0] = float("inf"), float("nan")
    t = t.to(dtype)
    first = np.argwhere(~np.isfinite(t.float().numpy()))[0].tolist()
    assert first == [1, 3, 0]
    with pytest.raises(CheckpointError, match=rf"'w' in f\.safetensors .* index \[1, 3, 0\]"):
        check_values("w", t, "f.safetensors")
    check_values("w", t, "f.safetensors", allow_non_finite=True)  # the opt-out
