"""``moe_stacked_experts``: two stacked Parameters per MoE layer, the same model and checkpoints outside.

References: the unstacked model (megatron's per-expert `SequentialMLP` parameters) with the same
weights, HF transformers' `Qwen3NextForCausalLM`, and megatron's own `dist_checkpointing` save/load.
fp32 on CPU; the bf16 grouped-GEMM check runs on a GPU.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nemo_qwen3_next import load_hf
from nemo_qwen3_next.hf_mapping import ours_to_hf
from nemo_qwen3_next.modules.grouped_experts import GroupedSequentialMLP
from nemo_qwen3_next.testing import random_hf_model, tiny_hf_config

cpu_model = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU whole-model reference")


def _pair(seed=1, **kw):
    hf = random_hf_model(tiny_hf_config(), seed=seed)
    kw.setdefault("linear_attention_chunk_size", 16)
    return hf, load_hf(hf, backend="local", **kw), load_hf(hf, backend="local", moe_stacked_experts=True, **kw)


def _experts(model):
    return [m for m in model.modules() if isinstance(m, GroupedSequentialMLP)]


def _per_expert_grads(model):
    """Parameter gradients under the old (per-expert) names: stacked grads split along the expert dim."""
    out = {}
    for name, p in model.named_parameters():
        head, _, last = name.rpartition(".")
        if last in ("weight1", "weight2"):
            sub = "linear_fc1" if last == "weight1" else "linear_fc2"
            for i, g in enumerate(p.grad.unbind(0)):
                out[f"{head}.local_experts.{i}.{sub}.weight"] = g
        else:
            out[name] = p.grad
    return out


def _lm_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def test_parameters_are_stacked_and_carry_megatrons_attributes():
    _, plain, stacked = _pair()
    for a, b in zip(_experts(plain), _experts(stacked)):
        names = [n for n, _ in b.named_parameters()]
        assert names == ["weight1", "weight2"]
        assert not [n for n, _ in a.named_parameters() if "weight1" in n]
        for name, sub in (("weight1", "linear_fc1"), ("weight2", "linear_fc2")):
            p = getattr(b, name)
            per = [getattr(e, sub).weight for e in a.local_experts]
            assert p.shape == (len(per), *per[0].shape)
            torch.testing.assert_close(p.detach(), torch.stack(per).detach(), rtol=0, atol=0)
            ref = vars(per[0])
            assert set(vars(p)) == set(ref) and "allreduce" in ref
            for k, v in ref.items():
                assert getattr(p, k) == (v + 1 if k == "partition_dim" else v), k
            # the per-expert weight is a view of the stacked Parameter's current storage
            assert getattr(b.local_experts[1], sub).weight.data_ptr() == p[1].data_ptr()


@cpu_model
@pytest.mark.parametrize("impl", ["sequential", "grouped_mm"])
def test_same_loss_and_gradients_as_per_expert_parameters_and_hf(monkeypatch, impl):
    if impl == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("needs torch._grouped_mm")
    monkeypatch.setenv("QWEN3_NEXT_MOE_EXPERTS", impl)
    hf, plain, stacked = _pair()
    torch.manual_seed(3)
    ids = torch.randint(0, hf.config.vocab_size, (2, 37))
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    losses = {}
    for key, m in (("hf", hf), ("plain", plain), ("stacked", stacked)):
        logits = m(ids, use_cache=False).logits if key == "hf" else m(ids, pos, None)
        losses[key] = _lm_loss(logits, ids)
        losses[key].backward()
    assert abs(losses["stacked"].item() - losses["plain"].item()) <= 1e-6
    assert abs(losses["stacked"].item() - losses["hf"].item()) <= 1e-4
    g_plain, g_stacked = dict((n, p.grad) for n, p in plain.named_parameters()), _per_expert_grads(stacked)
    assert g_plain.keys() == g_stacked.keys()
    for n, g in g_plain.items():
        torch.testing.assert_close(g_stacked[n], g, rtol=1e-5, atol=1e-7, msg=n)
    hf_params = dict(hf.named_parameters())
    experts = 0
    for name, g in ours_to_hf(g_stacked, stacked.config).items():  # HF parity with the switch on
        ref = hf_params[name].grad
        rel = ((g - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        assert rel <= 1e-4, f"{name}: relative gradient error {rel}"
        experts += ".mlp.experts." in name
    assert experts > 0


def test_state_dict_round_trip_both_ways():
    _, plain, stacked = _pair(seed=2)
    sd_plain, sd_stacked = plain.state_dict(), stacked.state_dict()
    assert list(sd_plain) == list(sd_stacked)  # same keys, same order
    for k in sd_plain:
        if isinstance(sd_plain[k], torch.Tensor):
            assert torch.equal(sd_plain[k], sd_stacked[k]), k
    # fresh weights elsewhere, then strict loads across the switch
    _, plain2, stacked2 = _pair(seed=7)
    stacked2.load_state_dict(sd_plain, strict=True)
    plain2.load_state_dict(stacked.state_dict(), strict=True)
    for a, b in zip(_experts(stacked2), _experts(plain)):
        torch.testing.assert_close(a.weight1.detach(), torch.stack([e.linear_fc1.weight for e in b.local_experts]),
                                   rtol=0, atol=0)
        torch.testing.assert_close(a.weight2.detach(), torch.stack([e.linear_fc2.weight for e in b.local_experts]),
                                   rtol=0, atol=0)
    for k, v in plain2.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, sd_plain[k]), k
    bad = dict(sd_plain)
    key = next(k for k in bad if k.endswith("local_experts.0.linear_fc1.weight"))
    bad[key] = bad[key][:-1]
    with pytest.raises(RuntimeError, match="size mismatch for .*local_experts.0.linear_fc1.weight"):
        stacked2.load_state_dict(bad)
    del bad[key]
    with pytest.raises(RuntimeError, match="Missing key.*local_experts.0.linear_fc1.weight"):
        stacked2.load_state_dict(bad)


def test_views_follow_dtype_moves_and_inplace_updates():
    _, _, stacked = _pair(seed=3)
    stacked.to(torch.float64)
    e = _experts(stacked)[0]
    assert e.weight1.dtype == torch.float64 and e.local_experts[2].linear_fc1.weight.dtype == torch.float64
    assert e.local_experts[2].linear_fc1.weight.data_ptr() == e.weight1[2].data_ptr()
    with torch.no_grad():
        e.weight2.mul_(3.0)  # an optimizer step
    assert torch.equal(e.local_experts[1].linear_fc2.weight, e.weight2[1])
    assert torch.equal(stacked.state_dict()[next(k for k in stacked.state_dict()
                                                 if k.endswith("local_experts.1.linear_fc2.weight"))], e.weight2[1])


def _sharded(model):
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    from megatron.core.dist_checkpointing.mapping import apply_factories
    from nemo_qwen3_next.nemo.streaming import NEMO_SHARDED_METADATA

    sd = model.sharded_state_dict(prefix="module.", metadata=dict(NEMO_SHARDED_METADATA))
    facts = [v for v in nested_values(sd) if isinstance(v, ShardedTensorFactory)]
    apply_factories(sd)
    return sd, facts


def test_sharded_state_dict_writes_the_per_expert_shards():
    """The stored shards (keys, global shapes, offsets, replica ids, values) equal SequentialMLP's."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    _, plain, stacked = _pair(seed=4)

    def shards(model):
        sd, _ = _sharded(model)
        out = {}
        for sh in nested_values(sd):
            if isinstance(sh, ShardedTensor):
                k = (sh.key, tuple(sh.global_offset), sh.flattened_range)
                assert k not in out
                out[k] = (tuple(sh.global_shape), tuple(sh.local_shape), tuple(sh.axis_fragmentations),
                          sh.replica_id, sh.prepend_axis_num, sh.data.detach().clone())
        return out

    a, b = shards(plain), shards(stacked)
    assert a.keys() == b.keys()
    assert any("experts.experts.linear_fc1.weight" in k[0] for k in a)
    for k in a:
        assert a[k][:5] == b[k][:5], k
        assert torch.equal(a[k][5], b[k][5]), k
    # the optimizer finds each stacked Parameter's entry by identity (get_param_id_to_sharded_param_map)
    from megatron.core.dist_checkpointing.optimizer import get_param_id_to_sharded_param_map

    params = list(stacked.parameters())
    sd = stacked.sharded_state_dict(prefix="module.")
    found = get_param_id_to_sharded_param_map(sd, iter(params))
    assert len(found) == len(params)


def test_flattened_ranges_as_the_distributed_optimizer_asks_for_them():
    """A flat slice of a stacked Parameter (the distributed optimizer's shard) becomes the matching flat
    pieces of the per-expert shards (values = those shards' flattened elements), and merges back."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    _, _, stacked = _pair(seed=4)
    e = _experts(stacked)[0]
    sd = e.sharded_state_dict(prefix="x.")
    for name in ("weight1", "weight2"):
        f, p = sd[f"x.{name}"], getattr(e, name)
        full = {(sh.key, tuple(sh.global_offset)): sh for sh in nested_values(f.build())}
        n = p[0].numel()
        for a, b in ((0, p.numel()), (n // 3, 2 * n + 5), (n + 1, n + 2), (p.numel() - 7, p.numel())):
            t = p.detach().flatten()[a:b]
            out = f.build_fn(f.key, t, f.replica_id, slice(a, b))
            pieces = [sh for sh in nested_values(out) if isinstance(sh, ShardedTensor)]
            assert sum(sh.data.numel() for sh in pieces) == b - a
            for sh in pieces:
                ref = full[(sh.key, tuple(sh.global_offset))]
                assert sh.local_shape == ref.local_shape
                assert torch.equal(sh.data, ref.data.flatten()[sh.flattened_range]), (name, a, b)
            loaded = dict_list_map_inplace(lambda x: x.data.clone() if isinstance(x, ShardedTensor) else x, out)
            torch.testing.assert_close(f.merge_fn(loaded), t, rtol=0, atol=0)


@pytest.mark.parametrize("save_stacked", [False, True])
def test_dist_checkpoint_loads_across_the_switch(tmp_path, save_stacked):
    """megatron `dist_checkpointing.save` with one layout, `load` + strict `load_state_dict` with the other."""
    from megatron.core import dist_checkpointing
    from nemo_qwen3_next.nemo import cpu
    from nemo_qwen3_next.nemo.streaming import NEMO_SHARDED_METADATA

    cpu.apply()  # megatron's save stages tensors with a CUDA synchronize otherwise
    _, plain, stacked = _pair(seed=5)
    src = stacked if save_stacked else plain
    meta = dict(NEMO_SHARDED_METADATA)
    dist_checkpointing.save(src.sharded_state_dict(prefix="module.", metadata=meta), str(tmp_path),
                            content_metadata=meta)
    _, plain2, stacked2 = _pair(seed=9)
    dst = plain2 if save_stacked else stacked2
    state = dist_checkpointing.load(dst.sharded_state_dict(prefix="module.", metadata=meta), str(tmp_path))
    dst.load_state_dict({k[len("module."):]: v for k, v in state.items() if k.startswith("module.")}, strict=True)
    ref = src.state_dict()
    for k, v in dst.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, ref[k]), k


def test_stacked_checkpoint_exports_to_the_hf_weights(tmp_path):
    """A dist checkpoint saved with the switch on, exported by the NeMo -> HF converter with the switch
    still on in its config, gives the HF model's tensors bitwise."""
    from megatron.core import dist_checkpointing
    from safetensors.torch import load_file

    from nemo_qwen3_next.nemo import cpu
    from nemo_qwen3_next.nemo.convert import PREFIX, dist_checkpoint_to_hf
    from nemo_qwen3_next.nemo.streaming import NEMO_SHARDED_METADATA

    cpu.apply()
    hf, _, stacked = _pair(seed=8)
    (tmp_path / "w").mkdir()
    (tmp_path / "hf").mkdir()
    meta = dict(NEMO_SHARDED_METADATA)
    dist_checkpointing.save(stacked.sharded_state_dict(prefix=PREFIX, metadata=meta), str(tmp_path / "w"),
                            content_metadata=meta)
    dist_checkpoint_to_hf(str(tmp_path / "w"), stacked.config, str(tmp_path / "hf"), progress=False)
    got = {}
    for f in (tmp_path / "hf").glob("*.safetensors"):
        got.update(load_file(str(f)))
    ref = hf.state_dict()
    assert got.keys() == ref.keys() and any(".mlp.experts.3." in k for k in got)
    for k, v in ref.items():
        assert torch.equal(got[k], v), k


def test_inference_decode_equals_the_unstacked_model():
    from nemo_qwen3_next.inference import generate

    hf, plain, stacked = _pair(seed=6)
    ids = torch.randint(0, hf.config.vocab_size, (1, 9))
    a = generate(plain.eval(), ids, max_new_tokens=6)
    b = generate(stacked.eval(), ids, max_new_tokens=6)
    assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def _tp_worker(out_path):
    """torchrun body (this file run as a script): TP=2+SP with stacked experts, the expert loop and the
    grouped GEMMs on the same model; each rank saves its loss, logits and stacked expert gradients."""
    sys.path.insert(0, os.path.dirname(__file__))
    from tp_worker import reduce_replicated_grads, tiny_tp_model

    model, config, rank = tiny_tp_model(sp=True, moe_stacked_experts=True)
    torch.manual_seed(3)
    ids = torch.randint(0, config.vocab_size, (2, 38))
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    res = {}
    impls = ["sequential"] + (["grouped_mm"] if hasattr(torch, "_grouped_mm") else [])
    for impl in impls:
        for m in _experts(model):
            m.impl = impl
        model.zero_grad(set_to_none=True)
        logits = model(ids, pos, None)
        loss = _lm_loss(logits, ids)
        loss.backward()
        reduce_replicated_grads(model, config)
        res[impl] = {"loss": loss.detach(), "logits": logits.detach(),
                     "grads": {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith(("weight1", "weight2"))}}
    torch.save(res, f"{out_path}.{rank}")
    torch.distributed.barrier()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """This file's TP=2+SP and EP=2 workers in one torchrun launch (one process start-up for both), writing
    DIR/tp.<rank> and DIR/ep.<rank>: DIR."""
    out = tmp_path_factory.mktemp("two_ranks")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", __file__, str(out)]
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _two_ranks_and_reference(out):
    """The workers' files `out`.<rank>, and the one-process per-expert reference on the same weights and
    batch: (out, reference model, logits, loss, parameter grads)."""
    hf = random_hf_model(tiny_hf_config(), seed=1)
    ref = load_hf(hf, backend="local", linear_attention_chunk_size=16)
    torch.manual_seed(3)
    ids = torch.randint(0, 256, (2, 38))
    logits = ref(ids, torch.arange(38).unsqueeze(0).expand_as(ids), None)
    loss = _lm_loss(logits, ids)
    loss.backward()
    return out, ref, logits, loss, {n: p.grad for n, p in ref.named_parameters()}


def test_tp2_sp_stacked_equals_tp1_unstacked(two_ranks):
    """TP=2+SP with the switch on (loop and grouped GEMMs) = TP=1 per-expert model: loss, logits, and
    each rank's stacked expert gradient = its TP shard of the TP=1 per-expert gradients."""
    from nemo_qwen3_next.sharding import shard_tensor

    out, _, logits, loss, ref_grads = _two_ranks_and_reference(two_ranks / "tp")
    checked = 0
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        assert len(got) == (2 if hasattr(torch, "_grouped_mm") else 1)
        for impl, r in got.items():
            assert abs(r["loss"].item() - loss.item()) <= 1e-5, impl
            assert (r["logits"] - logits.detach()).abs().max().item() <= 1e-4, impl
            assert r["grads"], impl
            for name, g in r["grads"].items():
                head, _, last = name.rpartition(".")
                sub = "linear_fc1" if last == "weight1" else "linear_fc2"
                for i in range(g.shape[0]):
                    n = f"{head}.local_experts.{i}.{sub}.weight"
                    want = shard_tensor(n, ref_grads[n], g[i].shape, rank, 2, True)
                    torch.testing.assert_close(g[i], want, rtol=1e-4, atol=1e-6, msg=f"{impl} rank {rank} {n}")
                    checked += 1
    assert checked > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_stacked_grouped_equals_unstacked_grouped_in_bf16(monkeypatch):
    """bf16 grouped GEMMs: stacked Parameters give the per-expert model's output and gradients."""
    monkeypatch.setenv("QWEN3_NEXT_MOE_EXPERTS", "grouped_mm")
    hf = random_hf_model(tiny_hf_config(), seed=5)
    mods = []
    for stacked in (False, True):
        m = _experts(load_hf(hf, backend="local", moe_stacked_experts=stacked))[0]
        mods.append(m.to("cuda", torch.bfloat16))
    E, H = mods[0].num_local_experts, mods[0].config.hidden_size
    counts = torch.tensor([7, 0] + [5] * (E - 2))
    x = torch.randn(int(counts.sum()), H, device="cuda", dtype=torch.bfloat16)
    probs = torch.rand(int(counts.sum()), device="cuda")
    probe = torch.randn_like(x)
    outs, grads = [], []
    for m in mods:
        assert m._grouped(x)
        out, _ = m(x, counts, probs)
        (out.float() * probe.float()).sum().backward()
        outs.append(out.float())
        if m.stacked:
            grads.append((m.weight1.grad.float(), m.weight2.grad.float()))
        else:
            grads.append((torch.stack([e.linear_fc1.weight.grad for e in m.local_experts]).float(),
                          torch.stack([e.linear_fc2.weight.grad for e in m.local_experts]).float()))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)  # same kernels on the same stacked values
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _ep_worker(out_path):
    """torchrun body: EP=2 with stacked experts (each rank holds half the experts), the same batch on
    both ranks; saves loss, logits and the stacked expert gradients with their global expert indices."""
    import re

    from megatron.core import parallel_state

    from nemo_qwen3_next import Qwen3NextConfig, build_model, init_distributed
    from nemo_qwen3_next.hf_mapping import hf_to_ours

    init_distributed(ep=2)
    hf = random_hf_model(tiny_hf_config(), seed=1)
    config = Qwen3NextConfig.from_hf(hf.config, expert_model_parallel_size=2, linear_attention_chunk_size=16,
                                     use_cpu_initialization=True, perform_initialization=False,
                                     params_dtype=torch.float32, moe_stacked_experts=True)
    model = build_model(config, backend="local", parallel_output=False).eval()
    full, rank = hf_to_ours(hf.state_dict(), config), parallel_state.get_expert_model_parallel_rank()
    e_local = _experts(model)[0].num_local_experts

    def global_name(k):  # local expert i on this rank = global expert rank * E_local + i
        return re.sub(r"local_experts\.(\d+)\.", lambda m: f"local_experts.{rank * e_local + int(m.group(1))}.", k)

    model.load_state_dict({k: full[global_name(k)] for k in model.state_dict() if not k.endswith("_extra_state")},
                          strict=False)
    torch.manual_seed(3)
    ids = torch.randint(0, config.vocab_size, (2, 38))
    logits = model(ids, torch.arange(38).unsqueeze(0).expand_as(ids), None)
    loss = _lm_loss(logits, ids)
    loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        if n.endswith(("weight1", "weight2")):
            head, _, last = n.rpartition(".")
            sub = "linear_fc1" if last == "weight1" else "linear_fc2"
            for i, g in enumerate(p.grad.unbind(0)):
                grads[global_name(f"{head}.local_experts.{i}.{sub}.weight")] = g.clone()
    torch.save({"loss": loss.detach(), "logits": logits.detach(), "grads": grads, "e_local": e_local},
               f"{out_path}.{rank}")
    torch.distributed.barrier()


def test_ep2_stacked_equals_one_process(two_ranks):
    """Expert parallel (EP=2, half the experts per rank, stacked) = one process with all experts: logits,
    loss, and every expert's gradient (twice the one-process one: both ranks send the same batch)."""
    out, ref, logits, loss, ref_grads = _two_ranks_and_reference(two_ranks / "ep")
    seen = set()
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        assert got["e_local"] * 2 == _experts(ref)[0].num_local_experts
        assert abs(got["loss"].item() - loss.item()) <= 1e-5
        assert (got["logits"] - logits.detach()).abs().max().item() <= 1e-4
        for n, g in got["grads"].items():
            torch.testing.assert_close(g, 2 * ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
            seen.add(n)
    assert seen == {n for n in ref_grads if ".local_experts." in n}


if __name__ == "__main__":  # torchrun: both workers, each after the other's parallel layout is gone
    from megatron.core import parallel_state

    _tp_worker(os.path.join(sys.argv[1], "tp"))
    parallel_state.destroy_model_parallel()
    _ep_worker(os.path.join(sys.argv[1], "ep"))
