"""MTP (`mtp.*`) weights survive HF -> NeMo -> HF unchanged (CPU, tiny model).

The model has no MTP block: the converter carries the tensors in `<nemo_dir>/extra/mtp.safetensors`
and writes them back on export, together with config.json fields such as `num_nextn_predict_layers`.
"""

import glob
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("nemo.collections.llm")

MTP_FILE = "model-mtp.safetensors"


def _fake_mtp(hidden):
    g = torch.Generator().manual_seed(11)
    return {
        "mtp.fc.weight": torch.randn(hidden, 2 * hidden, generator=g).to(torch.bfloat16),
        "mtp.layers.0.input_layernorm.weight": torch.randn(hidden, generator=g),  # fp32
        "mtp.layers.0.mlp.experts.0.down_proj.weight": torch.randn(hidden, 16, generator=g).to(torch.bfloat16),
        "mtp.norm.weight": torch.randn(hidden, generator=g).to(torch.bfloat16),
        "mtp.pre_fc_norm_hidden.weight": torch.randn(hidden, generator=g),
    }


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
    """save_pretrained tiny model + an extra safetensors file of `mtp.*` tensors + index + config field."""
    from safetensors.torch import save_file

    from nemo_qwen3_next.testing import random_hf_model, tiny_hf_config

    root = tmp_path_factory.mktemp("mtp")
    hf_dir = str(root / "hf")
    hf = random_hf_model(tiny_hf_config(), seed=0)
    hf.save_pretrained(hf_dir)
    main = _tensors_with_dtype(hf_dir)
    assert os.path.exists(os.path.join(hf_dir, "model.safetensors"))
    mtp = _fake_mtp(hf.config.hidden_size)
    save_file(mtp, os.path.join(hf_dir, MTP_FILE), metadata={"format": "pt"})
    weight_map = {k: "model.safetensors" for k in main}
    weight_map.update({k: MTP_FILE for k in mtp})
    with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg["num_nextn_predict_layers"] = 1
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    torch.manual_seed(3)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        logits = hf(ids).logits
    return dict(root=root, hf=hf_dir, main=main, mtp=mtp, ids=ids, logits=logits)


def _check_export(src, out):
    got = _tensors_with_dtype(out)
    expect = dict(src["main"], **src["mtp"])
    assert sorted(got) == sorted(expect)
    for k, v in expect.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)), k  # bitwise
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["num_nextn_predict_layers"] == 1
    return cfg


def test_mtp_round_trip_bitwise(hf_with_mtp, tmp_path):
    from safetensors import safe_open

    from nemo_qwen3_next.nemo import convert_hf_to_nemo, convert_nemo_to_hf

    nemo_dir, out = str(tmp_path / "nemo"), str(tmp_path / "hf_out")
    report = convert_hf_to_nemo(hf_with_mtp["hf"], nemo_dir, dtype="fp32", progress=False)
    assert sorted(report.carried) == sorted(hf_with_mtp["mtp"]) and not report.skipped
    assert f"carried, not used by the model: {len(hf_with_mtp['mtp'])} tensors" in str(report)
    side = os.path.join(nemo_dir, "extra", "mtp.safetensors")
    with safe_open(side, "pt") as f:
        assert sorted(f.keys()) == sorted(hf_with_mtp["mtp"])
    with open(os.path.join(nemo_dir, "extra", "hf_config.json")) as f:
        assert json.load(f)["num_nextn_predict_layers"] == 1
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "temporary directory left behind"

    report = convert_nemo_to_hf(nemo_dir, out, progress=False, max_shard_size="200KB")
    assert sorted(report.carried) == sorted(hf_with_mtp["mtp"])
    _check_export(hf_with_mtp, out)
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)["weight_map"]
    assert set(index) == set(hf_with_mtp["main"]) | set(hf_with_mtp["mtp"])
    shards = {os.path.basename(s) for s in glob.glob(os.path.join(out, "model-*-of-*.safetensors"))}
    assert len(shards) > 1 and set(index.values()) == shards

    from transformers import AutoModelForCausalLM

    hf2 = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(hf2(hf_with_mtp["ids"]).logits, hf_with_mtp["logits"])


def test_mtp_carried_by_llm_connectors(hf_with_mtp, tmp_path):
    from pathlib import Path

    from nemo.collections import llm

    from nemo_qwen3_next.nemo import Qwen3NextModel, qwen3_next_tiny_nemo

    imported = llm.import_ckpt(model=Qwen3NextModel(qwen3_next_tiny_nemo()), source=f"hf://{hf_with_mtp['hf']}",
                               output_path=tmp_path / "imported")
    assert (Path(imported) / "extra" / "mtp.safetensors").exists()
    exported = llm.export_ckpt(path=Path(imported), target="hf", output_path=tmp_path / "exported")
    _check_export(hf_with_mtp, str(exported))


def test_bad_mtp_side_file_is_one_clear_error(hf_with_mtp, tmp_path):
    """A NeMo checkpoint whose extra/mtp.safetensors is cut short: ConversionError, no output."""
    from nemo_qwen3_next.nemo import ConversionError, convert_hf_to_nemo, convert_nemo_to_hf

    nemo_dir = str(tmp_path / "nemo")
    convert_hf_to_nemo(hf_with_mtp["hf"], nemo_dir, dtype="fp32", progress=False)
    side = os.path.join(nemo_dir, "extra", "mtp.safetensors")
    with open(side, "r+b") as f:
        f.truncate(os.path.getsize(side) - 100)
    out = tmp_path / "out" / "hf"
    with pytest.raises(ConversionError, match="truncated"):
        convert_nemo_to_hf(nemo_dir, str(out), progress=False)
    assert not out.exists() and os.listdir(out.parent) == []
