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
from cp_worker import CHUNK, batch, packed, schedule_grads, token_loss  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "cp_worker.py")


def _reference(thd: bool):
    """The single-rank run: logits, loss, gradients by name (training mode, like the workers)."""
    model = load_hf(random_hf_model(tiny_hf_config(), seed=1), linear_attention_chunk_size=CHUNK).train()
    ids, labels, mask = batch()
    params = None
    if thd:
        ids, labels, mask, params = packed(ids, labels, mask)
    logits = model(ids, torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids), None, packed_seq_params=params)
    loss = token_loss(logits, labels, mask, mask.sum())
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def cp1():
    return {thd: _reference(thd) for thd in (False, True)}


def _rel(got, ref):
    return ((got - ref).abs().max() / ref.abs().max()).item()


# processes -> the runs of one torchrun launch (see cp_worker.py for the names)
LAUNCHES = {2: ["cp2", "cp2_thd", "cp2_recompute", "cp2_schedule"], 4: ["cp4", "tp2_sp_cp2", "cp4_thd", "tp2_sp_cp2_thd"]}


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


@pytest.mark.parametrize("name", ["cp2", "cp4", "tp2_sp_cp2", "cp2_thd", "cp4_thd", "tp2_sp_cp2_thd",
                                  "cp2_recompute"])
def test_cp_matches_cp1(cp_runs, cp1, name):
    """88 tokens = 2CP chunks of 22 / 11 per rank (the GDN chunk is 8); CP=4 with 2 GDN key heads;
    every rank holds the full gradient of its TP shard after the CP all-reduce. ``_thd``: four packed
    documents (24, 8, 40, 16 tokens), each cut into 2CP chunks (1 to 10 tokens, some shorter than the
    conv's 3-token left context), document boundaries at chunk and rank boundaries."""
    out, runs = cp_runs
    logits, loss, grads = cp1[name.endswith("_thd")]
    nproc = runs[name]
    tp = nproc // int(name.split("cp")[1].split("_")[0])
    for r in range(nproc):
        got = torch.load(out / f"{name}_rank{r}.pt")
        assert got["logits"].shape == logits.shape
        assert _rel(got["logits"], logits) <= 1e-5
        assert abs(got["loss"].item() - loss.item()) <= 1e-5 * loss.item()
        assert got["grads"].keys() == grads.keys()
        for pname, grad in got["grads"].items():
            ref = shard_tensor(pname, grads[pname], grad.shape, got["tp_rank"], tp, glu=True)
            assert _rel(grad, ref) <= 1e-5, (r, pname, _rel(grad, ref))


def test_cp_training_step_matches_cp1(cp_runs):
    """The step as NeMo runs it (Megatron's schedule, NeMo's masked-token loss, Megatron's DDP averaging
    over data x context parallel), MoE global aux loss on: CP=2 gives the one-process loss and every
    parameter's main grad (<= 1e-5). Without `fix_cp_aux_loss_scale` the aux loss's gradient weighs 1/CP
    and the router grads are off by far more than that."""
    out, _ = cp_runs
    model = load_hf(random_hf_model(tiny_hf_config(), seed=1), linear_attention_chunk_size=CHUNK).train()
    ids, labels, mask = batch()
    full = {"tokens": ids, "position_ids": torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids),
            "labels": labels, "loss_mask": torch.ones_like(mask)}
    grads, loss = schedule_grads(model, full, ids.numel())
    for r in range(2):
        got = torch.load(out / f"cp2_schedule_rank{r}.pt")
        assert abs(got["loss"].item() - loss.item()) <= 1e-5 * loss.item()
        assert got["grads"].keys() == grads.keys()
        for name, grad in got["grads"].items():
            assert _rel(grad, grads[name]) <= 1e-5, (r, name, _rel(grad, grads[name]))


def _simulate_ranks(size, inputs, local, compose, cu=None):
    """CP in one process: cut each global [b, T, ...] input into every rank's chunks (packed: THD layout
    of the documents `cu`), run `local` per rank, stack what the ranks send in rank order (the
    all-gather), `compose` per rank, and put the outputs back in global order. Autograd runs through
    all of it, so input grads are global too."""
    from nemo_qwen3_next.parallel.context import local_positions, thd_positions

    T, dev = inputs[0].shape[1], inputs[0].device
    pos = [local_positions(T // size, r, size, dev) if cu is None else thd_positions(cu, r, size, dev)
           for r in range(size)]
    parts = [local(*(t[:, p] for t in inputs)) for p in pos]
    sent = torch.cat([part[-1] for part in parts], dim=0)
    outs = [compose(part, sent, r) for r, part in enumerate(parts)]
    return torch.cat(outs, dim=1)[:, torch.argsort(torch.cat(pos))]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("packed", [False, True], ids=["bshd", "thd"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [2, 3, 4])
def test_gdn_composition_simulated(device, size, packed):
    """The CP conv and delta rule, all ranks simulated in one process, = one call on the whole sequence,
    outputs and input gradients. CPU: the torch reference, fp32, <= 1e-5 (chunks of 7, rule chunk 4;
    packed: three documents in chunks of 3, 1, 5 tokens). CUDA: the kernels (fla) in bf16 against the
    same kernels on the whole sequence (all 6 CUDA cases passed on H200:
    benchmarks/results/h200_model/dec03b_call2_gpu_tests.log)."""
    from nemo_qwen3_next.ops import causal_conv1d, gated_delta_rule
    from nemo_qwen3_next.parallel.context import (chunk_states, conv_tails, conv_with_left_context,
                                                  correct_with_states)

    dtype, tol = (torch.float32, 1e-5) if device == "cpu" else (torch.bfloat16, 2e-2)
    torch.manual_seed(size)
    B, T, Hk, Hv, K, V, D, W = 2, 2 * size * 7, 2, 4, 32, 32, 24, 4
    cu = None
    if packed:
        B, cu = 1, torch.tensor([0, 6 * size, 8 * size, 18 * size], device=device)
        T = int(cu[-1])
    shapes = [(B, T, Hk, K), (B, T, Hk, K), (B, T, Hv, V), (B, T, Hv), (B, T, Hv), (B, T, D)]
    q, k, v, a, b, x = (torch.randn(*sh, device=device).to(dtype).requires_grad_() for sh in shapes)
    w = torch.randn(D, W, device=device, dtype=dtype, requires_grad=True)
    leaves = (q, k, v, a, b, x, w)
    kw = dict(use_qk_l2norm=True, chunk_size=4)

    def rule_and_conv(rule, conv, q, k, v, a, b, x):
        g, beta = -torch.nn.functional.softplus(a.float()), b.float().sigmoid()
        return rule(q, k, v, g, beta), conv(x)

    def whole(q, k, v, g, beta):
        return gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu, **kw)[0]

    def cp_rule(q, k, v, g, beta):
        return _simulate_ranks(size, (q, k, v, g, beta), lambda *t: chunk_states(*t, cu_seqlens=cu, size=size, **kw),
                               lambda part, sent, r: correct_with_states(part[0], part[1], sent, r, size, cu), cu)

    def cp_conv(x):
        return _simulate_ranks(size, (x,), lambda x: (x, conv_tails(x, W - 1, cu, size)),
                               lambda part, sent, r: conv_with_left_context(part[0], w, None, "silu", sent, r, size,
                                                                            cu_seqlens=cu), cu)

    results = []
    for rule, conv in ((whole, lambda x: causal_conv1d(x, w, activation="silu", cu_seqlens=cu)[0]), (cp_rule, cp_conv)):
        o, y = rule_and_conv(rule, conv, q, k, v, a, b, x)
        torch.manual_seed(0)
        (o.float() * torch.randn_like(o.float())).sum().add((y.float() * torch.randn_like(y.float())).sum()).backward()
        results.append([o.detach(), y.detach()] + [t.grad.clone() for t in leaves])
        for t in leaves:
            t.grad = None
    for got, ref in zip(results[1], results[0]):
        assert _rel(got.float(), ref.float()) <= tol


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


def test_packed_document_not_divisible_by_2cp_is_one_line():
    from nemo_qwen3_next.parallel.context import split_packed

    group = types.SimpleNamespace(size=lambda: 2, rank=lambda: 0)
    with pytest.raises(ValueError, match=r"^packed document 1 has 6 tokens, not a multiple of 2 x "
                                         r"context_parallel_size = 4; pad every document .*\.$"):
        split_packed(torch.zeros(1, 14), torch.tensor([0, 8, 14]), group)


def test_cp_larger_than_world_is_one_line():
    code = "import nemo_qwen3_next as nq; nq.init_distributed(cp=2)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, TORCHDYNAMO_DISABLE="1"))
    assert proc.returncode != 0
    assert "ValueError: context_parallel_size (cp=2) > world size (1); launch at least 2" in proc.stderr


def _compose(*overrides, world_size=1):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from nemo_qwen3_next.training import config

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
    with initialize_config_dir(config_dir=root, version_base=None):
        raw = OmegaConf.to_container(compose(config_name="qwen3_next_tiny", overrides=list(overrides)), resolve=True)
    return config.validate(raw, world_size=world_size)


def test_tp2_cp2_conf_composes_and_needs_four_ranks():
    """conf/parallelism/tp2_cp2.yaml: TP=2 + SP x CP=2, accepted on 4 ranks (DP=1) and 8 (DP=2), refused
    in one line on 2. (A 4-process CPU run of it: 16 steps = one process to 4.8e-7, 51 s; docs/parallelism.md.)"""
    from nemo_qwen3_next.config import ConfigError

    p = _compose("parallelism=tp2_cp2", world_size=4).parallelism
    assert (p.tensor_model_parallel_size, p.context_parallel_size, p.sequence_parallel) == (2, 2, True)
    _compose("parallelism=tp2_cp2", "data.global_batch_size=16", world_size=8)
    with pytest.raises(ConfigError, match=r"^world size 2 is not divisible by tensor\(2\) x pipeline\(1\) x "
                                          r"context\(2\) = 4"):
        _compose("parallelism=tp2_cp2", world_size=2)


def test_dry_run_memory_counts_the_cp_exchanges():
    """--dry-run under CP: a rank's activations are those of seq_length / CP tokens plus what the CP
    exchanges keep for backward: every attention layer's gathered K/V (the whole sequence), every GDN
    layer's gathered [F | P] (fp32) and its o_P read-outs (sizes written out here from the config)."""
    import dataclasses

    from nemo_qwen3_next.training import recipe
    from nemo_qwen3_next.training.dry_run import count_parameters, memory_estimate

    T, b, cp = 4096, 2, 4
    tc = _compose("parallelism=cp2", f"parallelism.context_parallel_size={cp}", f"data.seq_length={T}",
                  f"data.micro_batch_size={b}", f"data.global_batch_size={b}", world_size=cp)
    mcfg = recipe.model_config(tc, cpu=True)
    counts = count_parameters(mcfg)
    mem = memory_estimate(counts, mcfg, tc, cp)
    short = dataclasses.replace(tc, data=dataclasses.replace(tc.data, seq_length=T // cp),
                                parallelism=dataclasses.replace(tc.parallelism, context_parallel_size=1))
    base = memory_estimate(counts, mcfg, short, 1)
    act = 2 if mcfg.bf16 else 4
    kv = 2 * T * b * mcfg.num_query_groups * mcfg.kv_channels * act
    hv, dk, dv = mcfg.linear_num_value_heads, mcfg.linear_key_head_dim, mcfg.linear_value_head_dim
    gdn = 2 * cp * b * hv * dk * (dk + dv) * 4 + (T // cp) * b * hv * dk * act
    kinds = mcfg.layer_types
    expected = kinds.count("full_attention") * kv + kinds.count("linear_attention") * gdn
    assert kinds.count("full_attention") and kinds.count("linear_attention")
    assert mem["cp_exchange_gib"] * 1024**3 == pytest.approx(expected, rel=1e-12)
    assert mem["activations_gib"] == pytest.approx(base["activations_gib"] + mem["cp_exchange_gib"], rel=1e-12)
    assert base["cp_exchange_gib"] == 0
