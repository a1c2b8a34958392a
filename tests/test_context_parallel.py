"""Context parallelism (gloo, CPU): CP=2, CP=4 and TP=2 x CP=2 give the CP=1 model's logits, loss and
every parameter gradient for the same global weights and batch (fp32, max relative error <= 1e-5)."""

import os
import subprocess
import sys
import types

import pytest
import torch

from nemo_qwen3_next import load_hf
from nemo_qwen3_next.sharding import shard_tensor
from nemo_qwen3_next.testing import random_hf_model, tiny_hf_config

sys.path.insert(0, os.path.dirname(__file__))
from cp_worker import CHUNK, batch, token_loss  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "cp_worker.py")


@pytest.fixture(scope="module")
def cp1():
    """The single-rank reference: logits, loss, gradients by name (training mode, like the workers)."""
    model = load_hf(random_hf_model(tiny_hf_config(), seed=1), linear_attention_chunk_size=CHUNK).train()
    ids, labels, mask = batch()
    logits = model(ids, torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids), None)
    loss = token_loss(logits, labels, mask, mask.sum())
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _rel(got, ref):
    return ((got - ref).abs().max() / ref.abs().max()).item()


LAUNCHES = {2: ["cp2"], 4: ["cp4", "tp2_sp_cp2"]}  # processes -> runs of one torchrun launch


@pytest.fixture(scope="module")
def cp_runs(tmp_path_factory):
    """One torchrun launch per process count; returns (directory, process count) per run name."""
    out, runs = tmp_path_factory.mktemp("cp"), {}
    for nproc, names in LAUNCHES.items():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
               WORKER, str(out)] + names
        env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs.update({name: nproc for name in names})
    return out, runs


@pytest.mark.parametrize("name", ["cp2", "cp4", "tp2_sp_cp2"])
def test_cp_matches_cp1(cp_runs, cp1, name):
    """88 tokens = 2CP chunks of 22 / 11 per rank (the GDN chunk is 8); CP=4 with 2 GDN key heads;
    every rank holds the full gradient of its TP shard after the CP all-reduce."""
    out, runs = cp_runs
    logits, loss, grads = cp1
    nproc = runs[name]
    tp = nproc // int(name.rsplit("cp", 1)[1])
    for r in range(nproc):
        got = torch.load(out / f"{name}_rank{r}.pt")
        assert got["logits"].shape == logits.shape
        assert _rel(got["logits"], logits) <= 1e-5
        assert abs(got["loss"].item() - loss.item()) <= 1e-5 * loss.item()
        assert got["grads"].keys() == grads.keys()
        for pname, grad in got["grads"].items():
            ref = shard_tensor(pname, grads[pname], grad.shape, got["tp_rank"], tp, glu=True)
            assert _rel(grad, ref) <= 1e-5, (r, pname, _rel(grad, ref))


def test_sequence_not_divisible_by_2cp_is_one_line():
    from nemo_qwen3_next.parallel.context import split_batch

    group = types.SimpleNamespace(size=lambda: 4)
    with pytest.raises(ValueError, match=r"^sequence length 90 \(tokens\) is not divisible by 2 x "
                                         r"context_parallel_size = 8; .* \(e\.g\. 96\)\.$"):
        split_batch({"tokens": torch.zeros(1, 90, dtype=torch.long)}, group)


def test_context_parallel_size_is_validated():
    from nemo_qwen3_next import ConfigError, qwen3_next_tiny_5m

    with pytest.raises(ConfigError, match=r"^context_parallel_size = 0 \(int\) must be an integer >= 1; fix "
                                          r"context_parallel_size\.$"):
        qwen3_next_tiny_5m(context_parallel_size=0)


def test_cp_larger_than_world_is_one_line():
    code = "import nemo_qwen3_next as nq; nq.init_distributed(cp=2)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, TORCHDYNAMO_DISABLE="1"))
    assert proc.returncode != 0
    assert "ValueError: context_parallel_size (cp=2) > world size (1); launch at least 2" in proc.stderr
