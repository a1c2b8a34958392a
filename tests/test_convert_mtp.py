"""MTP (`mtp.*`) weights through HF -> NeMo -> HF (CPU, tiny model).

With ``num_nextn_predict_layers: 1`` they map into the model's MTP block through the mapping table
(`weights/` holds ``mtp.layers.0.*``; nothing in `extra/mtp.safetensors`) and come back bitwise; the
block loads at TP=2 with the TP=1 logits. A config.json without MTP layers (and NeMo checkpoints
written before the block existed) keeps the old route: `mtp.*` carried unchanged in the side file.
"""

import glob
import json
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("nemo.collections.llm")

from test_convert import _free_port, _run  # noqa: E402  (tests/ is on sys.path under pytest)

MTP_FILE = "model-mtp.safetensors"


def _tensors_with_dtype(d):
    from safetensors import safe_open

    out = {}
    for fn in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        with safe_open(fn, "pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


@pytest.fixture(scope="module")
def hf_with_mtp(tmp_path_factory):
    """Tiny HF directory with a full MTP layer and num_nextn_predict_layers: 1."""
    from nemo_qwen3_next.testing import save_hf_with_mtp

    hf_dir = str(tmp_path_factory.mktemp("mtp") / "hf")
    hf, mtp = save_hf_with_mtp(hf_dir, seed=0)
    main = {k: v for k, v in _tensors_with_dtype(hf_dir).items() if not k.startswith("mtp.")}
    torch.manual_seed(3)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        logits = hf(ids).logits
    return dict(hf=hf_dir, main=main, mtp=mtp, ids=ids, logits=logits)


def _fake_mtp(hidden):
    g = torch.Generator().manual_seed(11)
    return {
        "mtp.fc.weight": torch.randn(hidden, 2 * hidden, generator=g).to(torch.bfloat16),
        "mtp.layers.0.input_layernorm.weight": torch.randn(hidden, generator=g),  # fp32
        "mtp.norm.weight": torch.randn(hidden, generator=g).to(torch.bfloat16),
    }


@pytest.fixture(scope="module")
def hf_carried(tmp_path_factory, hf_with_mtp):
    """The old route: `mtp.*` tensors (any subset, mixed dtypes) but no num_nextn_predict_layers."""
    from safetensors.torch import save_file

    hf_dir = str(tmp_path_factory.mktemp("mtp_carried") / "hf")
    shutil.copytree(hf_with_mtp["hf"], hf_dir)
    os.remove(os.path.join(hf_dir, MTP_FILE))
    mtp = _fake_mtp(64)
    save_file(mtp, os.path.join(hf_dir, MTP_FILE), metadata={"format": "pt"})
    with open(os.path.join(hf_dir, "model.safetensors.index.json")) as f:
        index = json.load(f)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("mtp.")}
    index["weight_map"].update({k: MTP_FILE for k in mtp})
    with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    del cfg["num_nextn_predict_layers"]
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return dict(hf_with_mtp, hf=hf_dir, mtp=mtp)


def _check_export(src, out, mtp_layers):
    got = _tensors_with_dtype(out)
    expect = dict(src["main"], **src["mtp"])
    assert sorted(got) == sorted(expect)
    for k, v in expect.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)), k  # bitwise
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg.get("num_nextn_predict_layers") == mtp_layers


@pytest.fixture(scope="module")
def nemo_mtp(hf_with_mtp, tmp_path_factory):
    from nemo_qwen3_next.nemo import convert_hf_to_nemo

    nemo_dir = str(tmp_path_factory.mktemp("nemo_mtp") / "nemo")
    report = convert_hf_to_nemo(hf_with_mtp["hf"], nemo_dir, dtype="fp32", progress=False)
    return nemo_dir, report


def test_mtp_mapped_into_the_model_round_trip_bitwise(hf_with_mtp, nemo_mtp, tmp_path):
    from nemo_qwen3_next.nemo import convert_nemo_to_hf
    from nemo_qwen3_next.nemo.streaming import DistCheckpointReader

    nemo_dir, report = nemo_mtp
    assert not report.carried and not report.skipped
    assert not os.path.exists(os.path.join(nemo_dir, "extra", "mtp.safetensors"))
    keys = set(DistCheckpointReader(os.path.join(nemo_dir, "weights")).metadata.state_dict_metadata)
    for k in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "final_layernorm.weight",
              "transformer_layer.self_attention.linear_qkv.weight", "transformer_layer.mlp.router.weight"):
        assert f"module.mtp.layers.0.{k}" in keys, k

    out = str(tmp_path / "hf_out")
    report = convert_nemo_to_hf(nemo_dir, out, progress=False, max_shard_size="200KB")
    assert not report.carried
    _check_export(hf_with_mtp, out, 1)
    from transformers import AutoModelForCausalLM

    hf2 = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(hf2(hf_with_mtp["ids"]).logits, hf_with_mtp["logits"])


def test_mtp_tp2_equals_tp1_and_tp2_checkpoint_exports_bitwise(hf_with_mtp, nemo_mtp, tmp_path):
    """TP=2 (gloo, 2 processes): MTP logits and loss = the TP=1 ones; Megatron's TP=2 save exports the
    same HF tensors bit for bit."""
    from nemo_qwen3_next import load_hf
    from nemo_qwen3_next.modules.mtp import MTPLossTracker, hidden_before_final_norm, mtp_logits_reference
    from nemo_qwen3_next.nemo import convert_nemo_to_hf

    nemo_dir, _ = nemo_mtp
    ids = hf_with_mtp["ids"]
    ids_path, out_path, tp2_weights = tmp_path / "ids.pt", tmp_path / "out.pt", tmp_path / "tp2_weights"
    torch.save(ids, ids_path)
    cmd = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "tests/mtp_tp_worker.py", nemo_dir, str(ids_path), str(out_path), str(tp2_weights)]
    rc, out = _run(cmd)
    assert rc == 0, out[-4000:]
    got = torch.load(out_path)

    model = load_hf(hf_with_mtp["hf"])
    # all T positions (sequence parallel splits T); the last one's "next token" is a wrap-around, and
    # causal attention keeps it from the others
    ref = mtp_logits_reference(model, hidden_before_final_norm(model, ids), torch.roll(ids, -1, 1))
    assert (got["logits"][:, :-1] - ref[:, :-1]).abs().max().item() <= 1e-5
    MTPLossTracker.pop()
    model.train()
    with torch.no_grad():
        model(ids, torch.arange(ids.shape[1]).expand_as(ids), None, labels=torch.roll(ids, -1, 1))
    model.eval()
    assert abs(got["mtp_loss"].item() - MTPLossTracker.pop()[0].item()) <= 1e-5

    nemo2 = tmp_path / "nemo_tp2"
    os.makedirs(nemo2)
    shutil.copytree(os.path.join(nemo_dir, "context"), nemo2 / "context")
    shutil.copytree(os.path.join(nemo_dir, "extra"), nemo2 / "extra")
    shutil.copytree(tp2_weights, nemo2 / "weights")
    assert len(glob.glob(str(nemo2 / "weights" / "*.distcp"))) >= 2
    convert_nemo_to_hf(str(nemo2), str(tmp_path / "hf_from_tp2"), progress=False)
    _check_export(hf_with_mtp, str(tmp_path / "hf_from_tp2"), 1)


def test_mtp_mapped_by_llm_connectors(hf_with_mtp, tmp_path):
    from pathlib import Path

    from nemo.collections import llm

    from nemo_qwen3_next.nemo import Qwen3NextModel, qwen3_next_tiny_nemo

    imported = llm.import_ckpt(model=Qwen3NextModel(qwen3_next_tiny_nemo()), source=f"hf://{hf_with_mtp['hf']}",
                               output_path=tmp_path / "imported")
    assert not (Path(imported) / "extra" / "mtp.safetensors").exists()
    exported = llm.export_ckpt(path=Path(imported), target="hf", output_path=tmp_path / "exported")
    _check_export(hf_with_mtp, str(exported), 1)


def test_config_without_mtp_layers_carries_mtp_side_file(hf_carried, tmp_path):
    """No num_nextn_predict_layers: `mtp.*` carried in extra/mtp.safetensors and written back (also how
    NeMo checkpoints converted before the MTP block existed still export)."""
    from safetensors import safe_open

    from nemo_qwen3_next.nemo import convert_hf_to_nemo, convert_nemo_to_hf

    nemo_dir, out = str(tmp_path / "nemo"), str(tmp_path / "hf_out")
    report = convert_hf_to_nemo(hf_carried["hf"], nemo_dir, dtype="fp32", progress=False)
    assert sorted(report.carried) == sorted(hf_carried["mtp"]) and not report.skipped
    assert f"carried, not used by the model: {len(hf_carried['mtp'])} tensors" in str(report)
    with safe_open(os.path.join(nemo_dir, "extra", "mtp.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(hf_carried["mtp"])
    report = convert_nemo_to_hf(nemo_dir, out, progress=False)
    assert sorted(report.carried) == sorted(hf_carried["mtp"])
    _check_export(hf_carried, out, None)


def test_mtp_config_without_mtp_tensors_is_one_clear_error(hf_with_mtp, tmp_path):
    from nemo_qwen3_next.nemo import ConversionError, convert_hf_to_nemo

    hf_dir = str(tmp_path / "hf")
    shutil.copytree(hf_with_mtp["hf"], hf_dir)
    os.remove(os.path.join(hf_dir, MTP_FILE))
    with open(os.path.join(hf_dir, "model.safetensors.index.json")) as f:
        index = json.load(f)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("mtp.")}
    with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    with pytest.raises(ConversionError, match="num_nextn_predict_layers to 0"):
        convert_hf_to_nemo(hf_dir, str(tmp_path / "nemo"), dtype="fp32", progress=False)
    assert not (tmp_path / "nemo").exists()


def test_bad_mtp_side_file_is_one_clear_error(hf_carried, tmp_path):
    """A NeMo checkpoint whose extra/mtp.safetensors is cut short: ConversionError, no output."""
    from nemo_qwen3_next.nemo import ConversionError, convert_hf_to_nemo, convert_nemo_to_hf

    nemo_dir = str(tmp_path / "nemo")
    convert_hf_to_nemo(hf_carried["hf"], nemo_dir, dtype="fp32", progress=False)
    side = os.path.join(nemo_dir, "extra", "mtp.safetensors")
    with open(side, "r+b") as f:
        f.truncate(os.path.getsize(side) - 100)
    out = tmp_path / "out" / "hf"
    with pytest.raises(ConversionError, match="truncated"):
        convert_nemo_to_hf(nemo_dir, str(out), progress=False)
    assert not out.exists() and os.listdir(out.parent) == []
