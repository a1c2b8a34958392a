"""TP=2 and TP=2+SP (two CPU processes, gloo) give the logits and loss of TP=1 for the same weights."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nemo_qwen3_next import load_hf
from nemo_qwen3_next.testing import random_hf_model, tiny_hf_config

WORKER = os.path.join(os.path.dirname(__file__), "tp_worker.py")


def _tp1():
    hf = random_hf_model(tiny_hf_config(), seed=1)
    model = load_hf(hf, linear_attention_chunk_size=16)
    torch.manual_seed(3)
    ids = torch.randint(0, 256, (2, 38))
    logits = model(ids, torch.arange(38).unsqueeze(0).expand_as(ids), None)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return logits.detach(), loss.detach(), dict(model.named_parameters())


def _tp1_fused_loss():
    hf = random_hf_model(tiny_hf_config(), seed=1)
    model = load_hf(hf, linear_attention_chunk_size=16)
    torch.manual_seed(3)
    ids = torch.randint(0, 256, (2, 38))
    token_loss = model(ids, torch.arange(38).unsqueeze(0).expand_as(ids), None, labels=torch.roll(ids, -1, 1))
    loss = token_loss.mean()
    loss.backward()
    return token_loss.detach(), loss.detach(), dict(model.named_parameters())


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory):
    """All TP=2 runs in one torchrun launch (see tp_worker.py for the names); the directory of their files."""
    out = tmp_path_factory.mktemp("tp")
    names = ["tp2_sp_labels", "tp2", "tp2_sp"] + (["tp2_sp_grouped_experts"] if hasattr(torch, "_grouped_mm") else [])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           WORKER, str(out), *names]
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_tp2_sp_fused_loss_matches_tp1(tp_runs):
    """The vocab-parallel fused LM head + loss at TP=2+SP = TP=1: per-token loss, output-layer shard grad."""
    got = torch.load(tp_runs / "tp2_sp_labels.pt")
    token_loss, loss, params = _tp1_fused_loss()
    assert got["logits"].shape == token_loss.shape == (2, 38)
    assert ((got["logits"] - token_loss).abs().max() / token_loss.abs().max()).item() <= 1e-5
    assert abs(got["loss"].item() - loss.item()) <= 1e-5
    assert len(got["grads"]) == 6
    for name, grad in got["grads"].items():
        ref = params[name].grad
        ref = ref[: grad.shape[0]] if name == "output_layer.weight" else ref  # rank 0 holds the first half
        rel = ((grad - ref).norm() / ref.norm()).item()
        assert rel <= 1e-4, (name, rel)


@pytest.mark.parametrize("name", ["tp2", "tp2_sp", "tp2_sp_grouped_experts"])
def test_tp2_matches_tp1(tp_runs, name):
    """TP=1 reference always runs the expert loop; the TP=2 run may use the grouped-GEMM experts."""
    if name.endswith("_grouped_experts") and not hasattr(torch, "_grouped_mm"):
        pytest.skip("needs torch._grouped_mm")
    got = torch.load(tp_runs / f"{name}.pt")
    logits, loss, params = _tp1()
    assert (got["logits"] - logits).abs().max().item() <= 1e-4
    assert abs(got["loss"].item() - loss.item()) <= 1e-5
    assert len(got["grads"]) == 5
    for name, grad in got["grads"].items():  # replicated params: the full gradient on every rank
        ref = params[name].grad
        rel = ((grad - ref).norm() / ref.norm()).item()
        assert rel <= 1e-4, (name, rel)
