"""Acceptance battery of issue 13: every malformed input is refused with one line naming the field,
tensor or file, one exception type (or exit code 2 for a CLI), and leaves nothing behind.

Kinds: config values, HF configs, damaged / inconsistent safetensors checkpoints, damaged NeMo
checkpoints, CLI misuse, Hydra overrides. CLI cases run the real scripts in fresh processes and
answer in < 3 s: they are refused before torch, Megatron or NeMo are imported (< 1 s of CPU).
The kill -9 cases run real conversions and kill them at several points: the target stays as it
was and the next run removes the stale temporary directory.
"""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H2N = os.path.join(ROOT, "examples", "convert_hf_to_nemo.py")
N2H = os.path.join(ROOT, "examples", "convert_nemo_to_hf.py")
GEN = os.path.join(ROOT, "examples", "generate.py")
ENV = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
ENV.update(TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
ST = "model.safetensors"


# ---------------------------------------------------------------------- fixtures: good inputs to damage
@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A tiny fp32 HF directory and a NeMo-layout directory (a real torch_dist weights/ + context/)."""
    from torch.distributed.checkpoint import FileSystemWriter, save

    from nemo_qwen3_next.testing import random_hf_model, tiny_hf_config

    root = tmp_path_factory.mktemp("good")
    hf = random_hf_model(tiny_hf_config(), seed=0)
    hf.save_pretrained(str(root / "hf"))
    nemo = root / "nemo"
    (nemo / "context").mkdir(parents=True)
    (nemo / "context" / "io.json").write_text(json.dumps({"root": {}, "objects": {}}))
    weights = nemo / "weights"
    save({"a": torch.randn(64, 64), "b": torch.randn(256)}, storage_writer=FileSystemWriter(str(weights)),
         no_dist=True)
    (weights / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    torch.save({}, weights / "common.pt")
    return dict(root=root, hf=str(root / "hf"), nemo=str(nemo), model=hf)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), f.read()


def _write_header(path, header, data):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def _edit_header(d, fn):
    path = os.path.join(d, ST)
    header, data = _header(path)
    fn(header)
    _write_header(path, header, data)


def _first(header, suffix):
    return next(k for k in header if k.endswith(suffix))


def _rewrite_tensors(d, fn):
    from safetensors.torch import load_file, save_file

    sd = load_file(os.path.join(d, ST))
    fn(sd)
    save_file(sd, os.path.join(d, ST), metadata={"format": "pt"})


def _edit_config(d, **changes):
    path = os.path.join(d, "config.json")
    cfg = json.load(open(path))
    cfg.update(changes)
    json.dump(cfg, open(path, "w"))


def _split_with_index(d, index=None):
    """Make `d` a sharded checkpoint: model.safetensors + model.safetensors.index.json."""
    header, _ = _header(os.path.join(d, ST))
    weight_map = {k: ST for k in header if k != "__metadata__"}
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        f.write(index if index is not None else json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def _set_index(d, fn):
    wm = _split_with_index(d)
    fn(wm)
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": wm}, f)


def _truncate(path, keep=None, cut=1000):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(keep if keep is not None else size - cut)


def _big_header(d):
    path = os.path.join(d, ST)
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", 10**12))


def _not_json_header(d):
    path = os.path.join(d, ST)
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe not json")


# ---------------------------------------------------------------------- CLI cases (fresh processes)
# name -> (script, damage(hf_copy, nemo_copy, out) -> argv, needle in the one stderr line)
def _hf_args(hf, nemo, out, *extra):
    return ["--input", hf, "--output", out, "--no-progress", *extra]


def _nemo_args(hf, nemo, out, *extra):
    return ["--input", nemo, "--output", out, "--no-progress", *extra]


def _damaged_hf(damage, needle):
    def argv(hf, nemo, out):
        damage(hf)
        return _hf_args(hf, nemo, out)
    return H2N, argv, needle


def _damaged_nemo(damage, needle):
    def argv(hf, nemo, out):
        damage(nemo)
        return _nemo_args(hf, nemo, out)
    return N2H, argv, needle


def _rm(*parts):
    return lambda d: os.remove(os.path.join(d, *parts))


def _write(rel, text):
    def damage(d):
        with open(os.path.join(d, rel), "w") as f:
            f.write(text)
    return damage


def _existing_output(hf, nemo, out):
    os.makedirs(out)
    with open(os.path.join(out, "keep.txt"), "w") as f:
        f.write("mine")
    return _hf_args(hf, nemo, out)


CLI = {
    # damaged / inconsistent safetensors checkpoints (refused from the headers, before NeMo is imported)
    "st_truncated": _damaged_hf(lambda d: _truncate(os.path.join(d, ST)), "model.safetensors is truncated"),
    "st_shorter_than_8_bytes": _damaged_hf(lambda d: _truncate(os.path.join(d, ST), keep=5), "shorter than"),
    "st_header_length_huge": _damaged_hf(_big_header, "header length"),
    "st_header_not_json": _damaged_hf(_not_json_header, "header is not JSON"),
    "st_unknown_dtype": _damaged_hf(lambda d: _edit_header(d, lambda h: h[_first(h, "A_log")].update(dtype="F4")),
                                    "A_log"),
    "st_offsets_do_not_fit_shape": _damaged_hf(
        lambda d: _edit_header(d, lambda h: h[_first(h, "A_log")].update(shape=[3, 3])), "data_offsets"),
    "st_overlapping_tensors": _damaged_hf(lambda d: _edit_header(d, lambda h: h[_first(h, "dt_bias")].update(
        data_offsets=h[_first(h, "A_log")]["data_offsets"])), "overlap"),
    "st_integer_weights": _damaged_hf(lambda d: _rewrite_tensors(d, lambda sd: sd.update(
        {"model.layers.0.linear_attn.A_log": torch.ones(4, dtype=torch.int32)})),
        "'model.layers.0.linear_attn.A_log'"),
    "st_no_weight_files": _damaged_hf(_rm(ST), "no *.safetensors files"),
    "index_not_json": _damaged_hf(lambda d: _split_with_index(d, index="{not json"), "model.safetensors.index.json"),
    "index_without_weight_map": _damaged_hf(lambda d: _split_with_index(d, index='{"metadata": {}}'),
                                            "weight_map"),
    "index_names_missing_file": _damaged_hf(lambda d: _set_index(d, lambda wm: wm.update(
        {"model.norm.weight": "model-00002-of-00002.safetensors"})), "model-00002-of-00002.safetensors"),
    "index_lists_absent_tensor": _damaged_hf(lambda d: _set_index(d, lambda wm: wm.update(
        {"model.layers.7.mlp.gate.weight": ST})), "model.layers.7.mlp.gate.weight"),
    "index_misses_stored_tensor": _damaged_hf(lambda d: _set_index(d, lambda wm: wm.pop("model.norm.weight")),
                                              "model.norm.weight"),
    "index_escapes_directory": _damaged_hf(lambda d: _set_index(d, lambda wm: wm.update(
        {"model.norm.weight": "../elsewhere.safetensors"})), "../elsewhere.safetensors"),
    # HF config.json problems a CLI sees first
    "config_not_json": _damaged_hf(_write("config.json", "{oops"), "config.json is not valid JSON"),
    "config_is_a_list": _damaged_hf(_write("config.json", "[1, 2]"), "not an object"),
    "config_missing": _damaged_hf(_rm("config.json"), "config.json does not exist"),
    "config_other_model_type": _damaged_hf(lambda d: _edit_config(d, model_type="llama"), "model_type = 'llama'"),
    # CLI misuse
    # examples/generate.py: settings and the checkpoint layout checked before torch is imported
    "gen_top_p_above_one": (GEN, lambda hf, nemo, out: ["--checkpoint", hf, "--prompt", "a", "--top-p", "1.5"],
                            "top_p = 1.5"),
    "gen_negative_temperature": (GEN, lambda hf, nemo, out: ["--checkpoint", hf, "--prompt", "a",
                                                             "--temperature", "-1"], "temperature = -1"),
    "gen_missing_checkpoint": (GEN, lambda hf, nemo, out: ["--checkpoint", hf + "_nope", "--prompt", "a"],
                               "hf_nope: unknown checkpoint layout"),
    "gen_unknown_layout": (GEN, lambda hf, nemo, out: ["--checkpoint", os.path.dirname(hf), "--prompt", "a"],
                           "unknown checkpoint layout"),
    "gen_empty_prompt": (GEN, lambda hf, nemo, out: ["--checkpoint", hf, "--prompt", ""], "--prompt is empty"),
    "gen_speculative_sampling": (GEN, lambda hf, nemo, out: ["--checkpoint", hf, "--prompt", "a", "--speculative",
                                                             "2", "--temperature", "0.7"], "greedy only"),
    "cli_no_arguments": (H2N, lambda hf, nemo, out: [], "--input"),
    "cli_unknown_option": (H2N, lambda hf, nemo, out: _hf_args(hf, nemo, out, "--fast"), "--fast"),
    "cli_bad_dtype": (H2N, lambda hf, nemo, out: _hf_args(hf, nemo, out, "--dtype", "fp8"), "--dtype"),
    "cli_input_missing": (H2N, lambda hf, nemo, out: _hf_args(hf + "_nope", nemo, out), "hf_nope"),
    "cli_input_is_a_file": (H2N, lambda hf, nemo, out: _hf_args(os.path.join(hf, ST), nemo, out),
                            "model.safetensors is not a directory"),
    "cli_nemo_dir_given_to_importer": (H2N, lambda hf, nemo, out: _hf_args(nemo, nemo, out), "config.json"),
    "cli_output_exists": (H2N, _existing_output, "--overwrite"),
    "cli_hf_dir_given_to_exporter": (N2H, lambda hf, nemo, out: _nemo_args(hf, hf, out), "weights/ is missing"),
    "cli_bad_shard_size": (N2H, lambda hf, nemo, out: _nemo_args(hf, nemo, out, "--max-shard-size", "5XB"),
                           "max_shard_size = '5XB'"),
    "cli_zero_shard_size": (N2H, lambda hf, nemo, out: _nemo_args(hf, nemo, out, "--max-shard-size", "0"),
                            "max_shard_size = '0'"),
    # damaged NeMo checkpoints (completeness is checked before any work)
    "nemo_no_context": _damaged_nemo(lambda d: shutil.rmtree(os.path.join(d, "context")), "context/ is missing"),
    "nemo_no_io_json": _damaged_nemo(_rm("context", "io.json"), "io.json"),
    "nemo_io_json_not_json": _damaged_nemo(_write("context/io.json", '{"root": '), "io.json is not valid JSON"),
    "nemo_no_metadata": _damaged_nemo(_rm("weights", ".metadata"), ".metadata"),
    "nemo_empty_metadata_json": _damaged_nemo(_write("weights/metadata.json", ""), "metadata.json"),
    "nemo_no_distcp": _damaged_nemo(lambda d: [os.remove(os.path.join(d, "weights", f)) for f in
                                               os.listdir(os.path.join(d, "weights")) if f.endswith(".distcp")],
                                    "no *.distcp files"),
    "nemo_extra_config_not_json": _damaged_nemo(lambda d: (os.makedirs(os.path.join(d, "extra")),
                                                           _write("extra/hf_config.json", "nope")(d)),
                                                "hf_config.json"),
}


def _run_cli(script, argv, cwd=ROOT):
    """(completed process, CPU seconds it used). The cases assert both the required < 3 s of wall time
    (two cases at a time on two cores) and < 1 s of CPU, which does not depend on what else shares the
    CI machine: a refusal takes ~0.2 s of CPU, importing torch alone ~2.3 s and NeMo ~17 s, so the CPU
    bound also shows the refusal came before the heavy imports."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([sys.executable, script, *argv], stdout=out, stderr=err, env=ENV, cwd=cwd)
        _, status, usage = os.wait4(p.pid, 0)  # this child's own rusage
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(p.args, p.returncode, out.read(), err.read()), \
            usage.ru_utime + usage.ru_stime


@pytest.fixture(scope="module")
def cli_results(good, tmp_path_factory):
    """All CLI cases, two at a time (each in its own copies of the good inputs)."""
    base = tmp_path_factory.mktemp("cli")

    def one(name):
        script, make_argv, needle = CLI[name]
        d = base / name
        hf, nemo = _copy(good["hf"], d / "hf"), _copy(good["nemo"], d / "nemo")
        out = str(d / "out" / "target")
        argv = make_argv(hf, nemo, out)
        before = sorted(os.listdir(os.path.dirname(out))) if os.path.isdir(os.path.dirname(out)) else None
        t0 = time.perf_counter()
        proc, seconds = _run_cli(script, argv)
        wall = time.perf_counter() - t0
        after = sorted(os.listdir(os.path.dirname(out))) if os.path.isdir(os.path.dirname(out)) else None
        return name, dict(proc=proc, seconds=seconds, wall=wall, needle=needle, before=before, after=after, out=out)

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, sorted(CLI)))


@pytest.mark.parametrize("name", sorted(CLI))
def test_cli_refuses_in_one_line(cli_results, name):
    r = cli_results[name]
    proc = r["proc"]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "error: " in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert r["needle"] in lines[0], lines[0]
    assert r["seconds"] < 1.0 and r["wall"] < 3.0, f"{r['seconds']:.1f} s of CPU, {r['wall']:.1f} s wall"
    assert r["after"] == r["before"], "output or temporary data left behind"
    if name == "cli_output_exists":
        assert open(os.path.join(r["out"], "keep.txt")).read() == "mine"


# ---------------------------------------------------------------------- config values
TINY = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
            ffn_hidden_size=96, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
            linear_value_head_dim=16, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
            moe_shared_expert_intermediate_size=32, vocab_size=128)

CONFIG = {
    "hidden_size_string": (dict(hidden_size="64"), "hidden_size = '64'"),
    "num_layers_zero": (dict(num_layers=0), "num_layers = 0"),
    "vocab_negative": (dict(vocab_size=-5), "vocab_size = -5"),
    "epsilon_zero": (dict(layernorm_epsilon=0.0), "layernorm_epsilon"),
    "dropout_above_one": (dict(attention_dropout=1.5), "attention_dropout"),
    "bool_as_string": (dict(tie_word_embeddings="yes"), "tie_word_embeddings"),
    "bool_as_int_size": (dict(linear_conv_kernel_dim=True), "linear_conv_kernel_dim"),
    "layer_types_string": (dict(layer_types="linear"), "layer_types"),
    "mlp_only_layers_float": (dict(mlp_only_layers=[0.5]), "mlp_only_layers"),
    "odd_rope_channels": (dict(kv_channels=6, layer_types=["full"] * 4), "rotary_percent"),
    "aux_loss_negative": (dict(moe_aux_loss_coeff=-1.0), "moe_aux_loss_coeff"),
    "topk_zero": (dict(moe_router_topk=0), "moe_router_topk = 0"),
    "tp_size_zero": (dict(tensor_model_parallel_size=0), "tensor_model_parallel_size"),
}


@pytest.mark.parametrize("name", sorted(CONFIG))
def test_bad_config_value(name):
    from nemo_qwen3_next import ConfigError, Qwen3NextConfig

    changes, needle = CONFIG[name]
    with pytest.raises(ConfigError) as e:
        Qwen3NextConfig(**{**TINY, **changes})
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


# ---------------------------------------------------------------------- HF configs
HF_CONFIG = {
    "model_type_llama": (dict(model_type="llama"), "model_type = 'llama'"),
    "hidden_size_string": (dict(hidden_size="64"), "hidden_size = '64'"),
    "kv_heads_zero": (dict(num_key_value_heads=0), "num_key_value_heads = 0"),
    "layers_negative": (dict(num_hidden_layers=-1), "num_hidden_layers = -1"),
    "eps_negative": (dict(rms_norm_eps=-1e-6), "rms_norm_eps"),
    "rope_theta_string": (dict(rope_theta="1e6"), "rope_theta"),
    "gelu": (dict(hidden_act="gelu"), "hidden_act"),
    "layer_types_too_short": (dict(layer_types=["linear_attention"]), "layer_types has 1 entries"),
    "head_dim_float": (dict(head_dim=32.0), "head_dim = 32.0"),
}


@pytest.mark.parametrize("name", sorted(HF_CONFIG))
def test_bad_hf_config(name, good, tmp_path):
    from nemo_qwen3_next import ConfigError, Qwen3NextConfig

    changes, needle = HF_CONFIG[name]
    d = _copy(good["hf"], tmp_path / "hf")
    _edit_config(d, **changes)
    with pytest.raises(ConfigError) as e:
        Qwen3NextConfig.from_hf(d)
    msg = str(e.value)
    assert needle in msg and "config.json" in msg and "\n" not in msg, msg


# ---------------------------------------------------------------------- load_hf: the same reader, by name
def _nan_at(d, name, index, value=float("nan")):
    def fn(sd):
        sd[name][index] = value
    _rewrite_tensors(d, fn)


LOAD = {
    "nan_weight": (lambda d: _nan_at(d, "model.layers.1.self_attn.o_proj.weight", (3, 5)),
                   "'model.layers.1.self_attn.o_proj.weight'", "index [3, 5]"),
    "inf_weight": (lambda d: _nan_at(d, "model.norm.weight", 7, float("inf")), "'model.norm.weight'", "index [7]"),
    "missing_tensor": (lambda d: _rewrite_tensors(d, lambda sd: sd.pop("model.layers.2.linear_attn.A_log")),
                       "model.layers.2.linear_attn.A_log", "missing"),
    "unexpected_tensor": (lambda d: _rewrite_tensors(d, lambda sd: sd.update({"model.layers.9.x.weight": torch.ones(2)})),
                          "model.layers.9.x.weight", "unexpected"),
    "wrong_shape": (lambda d: _rewrite_tensors(d, lambda sd: sd.update(
        {"model.layers.1.self_attn.o_proj.weight": torch.zeros(64, 100)})), "o_proj", "shape"),
    "truncated": (lambda d: _truncate(os.path.join(d, ST)), "model.safetensors is truncated", "re-download"),
    "broken_index": (lambda d: _split_with_index(d, index="[]"), "model.safetensors.index.json", "index"),
}


@pytest.mark.parametrize("name", sorted(LOAD))
def test_load_hf_names_the_tensor_or_file(name, good, tmp_path):
    from nemo_qwen3_next import CheckpointError, load_hf

    damage, *needles = LOAD[name]
    d = _copy(good["hf"], tmp_path / "hf")
    damage(d)
    with pytest.raises(CheckpointError) as e:
        load_hf(d)
    msg = str(e.value)
    assert all(n in msg for n in needles) and "\n" not in msg, msg


def test_non_finite_in_memory_model_and_the_opt_out(good, tmp_path):
    """The in-memory source is checked too; `allow_non_finite=True` loads the same weights as given."""
    from nemo_qwen3_next import CheckpointError, load_hf

    hf = good["model"]
    name = "model.layers.0.linear_attn.dt_bias"
    saved = hf.state_dict()[name].clone()
    try:
        with torch.no_grad():
            hf.state_dict()[name][1] = float("nan")
        with pytest.raises(CheckpointError, match=r"dt_bias.*index \[1\].*--allow-non-finite"):
            load_hf(hf)
        d = _copy(good["hf"], tmp_path / "hf")
        _nan_at(d, name, 1)
        model = load_hf(d, allow_non_finite=True)
        got = dict(model.named_parameters())["decoder.layers.0.self_attention.dt_bias"]
        assert torch.isnan(got[1]) and torch.equal(got[[0, 2, 3]], saved[[0, 2, 3]])
    finally:
        with torch.no_grad():
            hf.state_dict()[name].copy_(saved)


# ---------------------------------------------------------------------- NeMo checkpoint, deep checks
def _truncate_distcp(d):
    w = os.path.join(d, "weights")
    _truncate(os.path.join(w, next(f for f in os.listdir(w) if f.endswith(".distcp"))), cut=100)


def _rename_distcp(d):
    w = os.path.join(d, "weights")
    f = next(f for f in os.listdir(w) if f.endswith(".distcp"))
    os.rename(os.path.join(w, f), os.path.join(w, "x_" + f))


NEMO_DEEP = {
    "distcp_truncated": (_truncate_distcp, "is truncated"),
    "distcp_missing": (_rename_distcp, "is missing (listed in weights/.metadata)"),
    "metadata_garbage": (_write("weights/.metadata", "garbage"), ".metadata cannot be read"),
}


@pytest.mark.parametrize("name", sorted(NEMO_DEEP))
def test_nemo_checkpoint_deep_check(name, good, tmp_path):
    from nemo_qwen3_next.checkpoint import CheckpointError, check_nemo_dir

    damage, needle = NEMO_DEEP[name]
    d = _copy(good["nemo"], tmp_path / "nemo")
    check_nemo_dir(d, deep=True)  # the undamaged copy passes
    damage(d)
    check_nemo_dir(d)  # the cheap check cannot see it ...
    with pytest.raises(CheckpointError) as e:  # ... the deep one (run before any export work) does
        check_nemo_dir(d, deep=True)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


# ---------------------------------------------------------------------- Hydra overrides
HYDRA = {
    "max_steps_abc": (["trainer.max_steps=abc"], "trainer.max_steps = 'abc'"),
    "lr_negative": (["optim.lr=-1e-3"], "optim.lr = -0.001"),
    "lr_zero": (["optim.lr=0"], "optim.lr = 0"),
    "min_lr_above_lr": (["optim.min_lr=1.0"], "optim.min_lr"),
    "beta2_above_one": (["optim.adam_beta2=1.5"], "optim.adam_beta2"),
    "data_path_missing": (["data.paths=[/nonexistent/corpus_text_document]"], "/nonexistent/corpus_text_document.bin"),
    "blend_path_missing": (["data.paths=[0.3,/nonexistent/a,0.7,/nonexistent/b]"], "/nonexistent/a.bin"),
    "init_from_missing": (["checkpoint.init_from=/nonexistent/ckpt"], "checkpoint.init_from"),
    "seq_longer_than_positions": (["data.seq_length=8192"], "max_position_embeddings (4096)"),
    "tp_zero": (["parallelism.tensor_model_parallel_size=0"], "parallelism.tensor_model_parallel_size"),
    "micro_batch_string": (["data.micro_batch_size=four"], "data.micro_batch_size"),
    "seed_string": (["seed=abc"], "seed = 'abc'"),
}


@pytest.mark.parametrize("name", sorted(HYDRA))
def test_bad_hydra_override(name):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from nemo_qwen3_next.config import ConfigError
    from nemo_qwen3_next.training.config import validate

    overrides, needle = HYDRA[name]
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base=None):
        raw = OmegaConf.to_container(compose(config_name="qwen3_next_tiny", overrides=overrides), resolve=True)
    with pytest.raises(ConfigError) as e:
        validate(raw, world_size=1)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


# ---------------------------------------------------------------------- kill -9 of a running conversion
def _wait_for(pred, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        hit = pred()
        if hit:
            return hit
        if proc.poll() is not None:
            return None
        time.sleep(0.001)
    return None


def _tmp_dir(parent, base):
    hits = [e for e in os.listdir(parent) if e.startswith(f".{base}.tmp-")]
    return os.path.join(parent, hits[0]) if hits else None


KILL_POINTS = {  # name -> what must exist inside the temporary directory when the process is killed
    "started": lambda tmp: True,
    "weights_written": lambda tmp: os.path.exists(os.path.join(tmp, "weights", ".metadata")),
    "writing_context": lambda tmp: os.path.isdir(os.path.join(tmp, "context")),
}


def test_kill_9_leaves_target_untouched_and_next_run_cleans_up(good, tmp_path):
    """Three conversions onto an existing target (--overwrite), killed with SIGKILL at different
    points: the target keeps its content; the next run for the target removes every `.tmp-*`."""
    def kill_at(name):
        parent = tmp_path / name
        target = parent / "nemo"
        target.mkdir(parents=True)
        (target / "keep.txt").write_text("previous")
        proc = subprocess.Popen([sys.executable, H2N, "--input", good["hf"], "--output", str(target), "--overwrite",
                                 "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                                cwd=ROOT, preexec_fn=lambda: os.nice(10))  # the watcher must not miss a phase
        point = KILL_POINTS[name]
        hit = _wait_for(lambda: (lambda t: t if t and point(t) else None)(_tmp_dir(parent, "nemo")), proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return name, (hit, parent, target)

    with ThreadPoolExecutor(3) as pool:
        results = dict(pool.map(kill_at, sorted(KILL_POINTS)))
    for name, (hit, parent, target) in results.items():
        assert hit, f"{name}: the conversion ended before reaching the kill point"
        assert sorted(os.listdir(target)) == ["keep.txt"] and (target / "keep.txt").read_text() == "previous", name
        assert _tmp_dir(parent, "nemo"), f"{name}: kill -9 left no temporary directory (nothing tested)"
        # the next run for this target (here refused: no --overwrite) removes the stale directory
        proc, seconds = _run_cli(H2N, ["--input", good["hf"], "--output", str(target), "--no-progress"])
        assert proc.returncode == 2 and "--overwrite" in proc.stderr and seconds < 1.0, proc.stderr
        assert "cleaned up" in proc.stderr and ".nemo.tmp-" in proc.stderr  # reported, not silent
        assert sorted(os.listdir(parent)) == ["nemo"], (name, os.listdir(parent))
        assert (target / "keep.txt").read_text() == "previous"


# ---------------------------------------------------------------------- pretrain CLI (fresh processes)
PRETRAIN = os.path.join(ROOT, "examples", "pretrain.py")
PRETRAIN_CLI = {  # name -> (arguments, needle in the one stderr line)
    "max_steps_string": (["trainer.max_steps=abc"], "trainer.max_steps = 'abc'"),
    "lr_negative": (["optim.lr=-1e-3"], "optim.lr = -0.001"),
    "data_path_missing": (["data.paths=[/nonexistent/corpus_text_document]"], "/nonexistent/corpus_text_document.bin"),
    "init_from_missing": (["checkpoint.init_from=/nonexistent/ckpt"], "checkpoint.init_from"),
    "seq_longer_than_positions": (["data.seq_length=8192"], "max_position_embeddings (4096)"),
    "tp_larger_than_world": (["parallelism.tensor_model_parallel_size=2"], "world size 1"),
    "model_size_negative": (["model.hidden_size=-1"], "model.hidden_size = -1"),
    "unknown_field": (["trainer.max_stepz=5"], "did you mean"),
    "80b_needs_data_or_more_ranks": (["--config-name", "qwen3_next_80b_a3b"], "world size 1"),
}


@pytest.fixture(scope="module")
def pretrain_cli_results(tmp_path_factory):
    base = tmp_path_factory.mktemp("pretrain_cli")
    results = {}
    for name, (args, needle) in PRETRAIN_CLI.items():  # one at a time: the wall-clock bound is per process
        run_dir = base / name
        t0 = time.perf_counter()
        proc, seconds = _run_cli(PRETRAIN, [f"run_dir={run_dir}", *args], cwd=base)
        results[name] = dict(proc=proc, cpu=seconds, wall=time.perf_counter() - t0, needle=needle, run_dir=run_dir)
    return results


@pytest.mark.parametrize("name", sorted(PRETRAIN_CLI))
def test_pretrain_cli_refuses_in_one_line(pretrain_cli_results, name):
    """Through the real script: exit code 2, one line on stderr naming the field, nothing on stdout,
    no run directory (Hydra's output dir included), < 3 s wall (measured ~0.25 s: the values are
    checked before torch / Megatron / NeMo are imported, whose import alone takes 4-12 s)."""
    r = pretrain_cli_results[name]
    proc = r["proc"]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("pretrain.py: config error: ") and r["needle"] in lines[0], lines[0]
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert not r["run_dir"].exists(), "a refused run left its run directory behind"
    assert r["wall"] < 3.0 and r["cpu"] < 1.5, f"{r['wall']:.2f} s wall, {r['cpu']:.2f} s CPU"
