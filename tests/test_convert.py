"""HF <-> NeMo checkpoint conversion of a tiny random Qwen3-Next (CPU).

References are independent of our converter: transformers' own forward and its safetensors
files, Megatron's own `dist_checkpointing.save`, and torch.distributed TP=2 loading.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("nemo.collections.llm")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _run(args, timeout=300):
    """Run python with `args`; on timeout kill its whole process group (torchrun workers included)."""
    proc = subprocess.Popen([sys.executable] + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=ENV, cwd=ROOT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(args)}\n{out[-3000:]}")
    return proc.returncode, out


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _save_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(250)}
    vocab.update({"<unk>": 250, "<|endoftext|>": 251})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<|endoftext|>").save_pretrained(path)


def _tensors(d):
    from safetensors.torch import load_file

    out = {}
    for fn in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        out.update(load_file(fn))
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny fp32 HF checkpoint (+ tokenizer), converted with the CLI."""
    from nemo_qwen3_next.testing import random_hf_model, tiny_hf_config

    root = tmp_path_factory.mktemp("convert")
    hf_dir, nemo_dir = str(root / "hf"), str(root / "nemo")
    hf = random_hf_model(tiny_hf_config(), seed=0)
    hf.save_pretrained(hf_dir)
    _save_tokenizer(hf_dir)
    with open(os.path.join(hf_dir, "generation_config.json"), "w") as f:  # non-weight files export must carry
        json.dump({"do_sample": True, "temperature": 0.7, "top_k": 20}, f)
    with open(os.path.join(hf_dir, "README.md"), "w") as f:
        f.write("# tiny\n")
    rc, out = _run(["examples/convert_hf_to_nemo.py", "--input", hf_dir, "--output", nemo_dir, "--dtype", "fp32"])
    assert rc == 0, out[-3000:]
    torch.manual_seed(3)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        logits = hf(ids).logits
    return dict(root=root, hf=hf_dir, nemo=nemo_dir, ids=ids, logits=logits)


@pytest.fixture(scope="module", autouse=True)
def cli_runs(ckpts, tmp_path_factory):
    """The TP=2 load (torchrun) and the export CLI, started with this module's first test so that they run
    beside each other and the in-process tests (the machine has two cores): name -> (future, directory)."""
    tp2, export = tmp_path_factory.mktemp("tp2"), tmp_path_factory.mktemp("export")
    ids_path = tp2 / "ids.pt"
    torch.save(ckpts["ids"], ids_path)
    # an explicit free port: with --master-port 0 the NeMo-importing workers hang in rendezvous
    tp2_cmd = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
               "tests/convert_tp2_worker.py", ckpts["nemo"], str(ids_path), str(tp2 / "logits.pt"),
               str(tp2 / "tp2_weights")]
    export_cmd = ["examples/convert_nemo_to_hf.py", "--input", ckpts["nemo"], "--output", str(export / "hf_out"),
                  "--max-shard-size", "200KB"]
    with ThreadPoolExecutor(2) as pool:
        yield {"tp2": (pool.submit(_run, tp2_cmd), tp2), "export": (pool.submit(_run, export_cmd), export)}


def test_nemo_checkpoint_layout(ckpts):
    d = ckpts["nemo"]
    assert os.path.exists(os.path.join(d, "weights", "metadata.json"))
    assert os.path.exists(os.path.join(d, "weights", ".metadata"))
    assert os.path.exists(os.path.join(d, "context", "io.json"))
    tok = os.path.join(d, "context", "nemo_tokenizer")
    assert sorted(os.listdir(tok)) and not glob.glob(os.path.join(tok, "*.safetensors"))
    assert not [p for p in os.listdir(ckpts["root"]) if p.startswith(".")], "temporary directory left behind"


def test_loaded_nemo_logits_match_hf(ckpts):
    from nemo_qwen3_next.nemo import Qwen3NextModel, load_nemo

    model = load_nemo(ckpts["nemo"])
    assert isinstance(model, Qwen3NextModel)
    ids = ckpts["ids"]
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        got = model.eval()(input_ids=ids, position_ids=pos, attention_mask=None)
    assert (got - ckpts["logits"]).abs().max().item() <= 1e-4
    assert model.tokenizer.text_to_ids("t3 t7") == [3, 7]


def test_streamed_checkpoint_equals_megatron_save(ckpts, tmp_path):
    """Same keys, chunks, values, common.pt and metadata.json as Megatron's own save of the same weights."""
    from megatron.core import dist_checkpointing

    from nemo_qwen3_next import load_hf
    from nemo_qwen3_next.nemo import cpu
    from nemo_qwen3_next.nemo.convert import NEMO_SHARDED_METADATA, PREFIX
    from nemo_qwen3_next.nemo.streaming import DistCheckpointReader

    cpu.apply()
    model = load_hf(ckpts["hf"], dtype=torch.float32)
    ref_dir = str(tmp_path / "ref")
    os.makedirs(ref_dir)
    dist_checkpointing.save(model.sharded_state_dict(prefix=PREFIX, metadata=dict(NEMO_SHARDED_METADATA)),
                            ref_dir, content_metadata=dict(NEMO_SHARDED_METADATA))
    ours = DistCheckpointReader(os.path.join(ckpts["nemo"], "weights"))
    ref = DistCheckpointReader(ref_dir)
    assert sorted(ours.keys()) == sorted(ref.keys())
    n = 0
    for key, md in ref.metadata.state_dict_metadata.items():
        o = ours.metadata.state_dict_metadata[key]
        if not hasattr(md, "chunks"):  # BytesIO (ShardedObject)
            continue
        assert [(tuple(c.offsets), tuple(c.sizes)) for c in o.chunks] == \
               [(tuple(c.offsets), tuple(c.sizes)) for c in md.chunks], key
        assert o.properties.dtype == md.properties.dtype, key
        for c in md.chunks:
            assert torch.equal(ours._read_chunk(key, c.offsets), ref._read_chunk(key, c.offsets)), key
            n += 1
    assert n > 50
    for fn in ("metadata.json",):
        with open(os.path.join(ref_dir, fn)) as a, open(os.path.join(ckpts["nemo"], "weights", fn)) as b:
            assert json.load(a) == json.load(b)
    assert torch.load(os.path.join(ref_dir, "common.pt"), weights_only=False).keys() == \
        torch.load(os.path.join(ckpts["nemo"], "weights", "common.pt"), weights_only=False).keys()


def test_tp2_loads_same_checkpoint_and_export_reads_tp_split(ckpts, cli_runs, tmp_path):
    run, d = cli_runs["tp2"]
    out_path, tp2_weights = d / "logits.pt", d / "tp2_weights"
    rc, out = run.result()
    assert rc == 0, out[-4000:]
    got = torch.load(out_path)
    assert (got - ckpts["logits"]).abs().max().item() <= 1e-4

    # the checkpoint Megatron wrote at TP=2 (split chunks, 2 ranks' files) exports bitwise exactly
    from nemo_qwen3_next.nemo import convert_nemo_to_hf

    nemo2 = tmp_path / "nemo_tp2"
    os.makedirs(nemo2)
    shutil.copytree(os.path.join(ckpts["nemo"], "context"), nemo2 / "context")
    shutil.copytree(tp2_weights, nemo2 / "weights")
    assert len(glob.glob(str(nemo2 / "weights" / "*.distcp"))) >= 2
    convert_nemo_to_hf(str(nemo2), str(tmp_path / "hf_from_tp2"), progress=False)
    a, b = _tensors(ckpts["hf"]), _tensors(str(tmp_path / "hf_from_tp2"))
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_export_cli_bitwise_round_trip(ckpts, cli_runs):
    run, d = cli_runs["export"]
    out = str(d / "hf_out")
    rc, log = run.result()
    assert rc == 0, log[-3000:]
    a, b = _tensors(ckpts["hf"]), _tensors(out)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shards = sorted(glob.glob(os.path.join(out, "model-*-of-*.safetensors")))
    assert len(shards) > 1 and set(index["weight_map"]) == set(a)
    assert {os.path.basename(s) for s in shards} == set(index["weight_map"].values())
    for fn in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
               "README.md"):
        with open(os.path.join(ckpts["hf"], fn), "rb") as a, open(os.path.join(out, fn), "rb") as b:
            assert a.read() == b.read(), fn
    with open(os.path.join(ckpts["hf"], "config.json")) as a, open(os.path.join(out, "config.json")) as b:
        src, got = json.load(a), json.load(b)
    assert list(got) == list(src) and got == src  # the imported config.json, keys (e.g. "dtype"), values, order

    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf2 = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf2).__name__ == "Qwen3NextForCausalLM"
    with torch.no_grad():
        assert torch.equal(hf2(ckpts["ids"]).logits, ckpts["logits"])
    assert AutoTokenizer.from_pretrained(out)("t5 t9")["input_ids"] == [5, 9]


def test_llm_import_export_connectors(ckpts, tmp_path):
    from pathlib import Path

    from nemo.collections import llm

    from nemo_qwen3_next.nemo import Qwen3NextModel, qwen3_next_tiny_nemo

    imported = llm.import_ckpt(model=Qwen3NextModel(qwen3_next_tiny_nemo()), source=f"hf://{ckpts['hf']}",
                               output_path=tmp_path / "imported")
    assert Path(imported) == tmp_path / "imported"
    exported = llm.export_ckpt(path=Path(imported), target="hf", output_path=tmp_path / "exported")
    a, b = _tensors(ckpts["hf"]), _tensors(str(exported))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- bad inputs
def _copy_hf(ckpts, tmp_path):
    d = tmp_path / "hf_bad"
    shutil.copytree(ckpts["hf"], d)
    return str(d)


def _rewrite(d, fn):
    from safetensors.torch import load_file, save_file

    path = os.path.join(d, "model.safetensors")
    sd = load_file(path)
    fn(sd)
    save_file(sd, path, metadata={"format": "pt"})


def _edit_config(d, **changes):
    path = os.path.join(d, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


def _truncate(d):
    path = os.path.join(d, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)


BAD = {
    "missing": (lambda d: _rewrite(d, lambda sd: sd.pop("model.layers.2.linear_attn.A_log")),
                "model.layers.2.linear_attn.A_log"),
    "unknown": (lambda d: _rewrite(d, lambda sd: sd.update({"model.layers.9.foo.weight": torch.zeros(2)})),
                "model.layers.9.foo.weight"),
    "wrong_shape": (lambda d: _rewrite(d, lambda sd: sd.update(
        {"model.layers.1.self_attn.o_proj.weight": torch.zeros(64, 100)})), "model.layers.1.self_attn.o_proj.weight"),
    "truncated": (_truncate, "truncated"),
    "nan": (lambda d: _rewrite(d, lambda sd: sd["model.layers.3.mlp.experts.1.up_proj.weight"].__setitem__(
        (2, 9), float("nan"))), "'model.layers.3.mlp.experts.1.up_proj.weight'"),  # refused mid-stream
    "integer_dtype": (lambda d: _rewrite(d, lambda sd: sd.update({"model.norm.weight": torch.ones(64, dtype=torch.int64)})),
                      "model.norm.weight"),
    "config_disagrees": (lambda d: _edit_config(d, linear_num_value_heads=2), "linear_attn"),
    "config_layers": (lambda d: _edit_config(d, num_hidden_layers=3, layer_types=[
        "linear_attention", "full_attention", "linear_attention"]), "model.layers.3"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_clear_error_no_output(ckpts, tmp_path, case):
    from nemo_qwen3_next.nemo import ConversionError, convert_hf_to_nemo

    d = _copy_hf(ckpts, tmp_path)
    corrupt, needle = BAD[case]
    corrupt(d)
    out = tmp_path / "out" / "nemo"
    with pytest.raises(ConversionError) as exc:
        convert_hf_to_nemo(d, str(out), progress=False)
    assert needle in str(exc.value), str(exc.value)
    assert not out.exists()
    assert not os.path.exists(out.parent) or os.listdir(out.parent) == []


def test_existing_output_needs_overwrite(ckpts, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc, log = _run(["examples/convert_hf_to_nemo.py", "--input", ckpts["hf"], "--output", str(out), "--no-progress"])
    assert rc == 2 and "--overwrite" in log, log[-2000:]
    assert (out / "keep.txt").read_text() == "x"
    assert sorted(os.listdir(tmp_path)) == ["exists"]

    from nemo_qwen3_next.nemo import convert_hf_to_nemo

    convert_hf_to_nemo(ckpts["hf"], str(out), overwrite=True, progress=False)
    assert sorted(os.listdir(out)) == ["context", "extra", "weights"]  # extra/hf_config.json: config fields
    assert sorted(os.listdir(tmp_path)) == ["exists"]
