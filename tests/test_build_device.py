"""`build_model(device=...)`: every parameter made where it is asked for, the same model as the old path.

The GPU case (`device="cuda"`, no CPU init and no `.cuda()` copy) cannot run here; on CPU the same
mechanism (a `torch.device` context around construction) is checked with ``"meta"``, where any
parameter that escaped the context would show up as a CPU tensor, and with ``"cpu"``, which must give
the old model bit for bit. The last test repeats the comparison on a GPU when there is one.
"""

import pytest
import torch

from nemo_qwen3_next import Qwen3NextConfig, build_model, init_single_process
from nemo_qwen3_next.modules import GatedDeltaNet

TINY = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
            ffn_hidden_size=96, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
            linear_value_head_dim=16, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
            moe_shared_expert_intermediate_size=32, vocab_size=128)


# CPU: the same kernels on the same values, bit for bit; GPU: the MoE un-permute adds with atomics (any order)
_TOL = {"cpu": dict(rtol=0, atol=0), "cuda": dict(rtol=1e-4, atol=1e-4)}


def _build(seed=0, device=None, **changes):
    init_single_process()
    torch.manual_seed(seed)
    return build_model(Qwen3NextConfig(**{**TINY, **changes}), backend="local", device=device)


def _layout(model):
    return {n: (tuple(p.shape), p.dtype) for n, p in model.named_parameters()}


def _logits(model, device="cpu"):
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        return model(ids, torch.arange(12, device=device)[None].expand(2, 12), None)


def test_meta_build_has_every_parameter_on_meta_and_loads_the_old_model():
    old = _build(use_cpu_initialization=True)
    new = _build(device="meta", use_cpu_initialization=True)
    assert {p.device.type for p in new.parameters()} == {"meta"}  # nothing escaped the context (A_log, norms, conv)
    assert _layout(new) == _layout(old)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # Megatron's RoPE follows the current device
    old.to(dev)
    new.to_empty(device=dev)
    new.load_state_dict(old.state_dict())
    torch.testing.assert_close(_logits(new, dev), _logits(old, dev), **_TOL[dev])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU placement check")
def test_cpu_device_is_the_old_build_bit_for_bit():
    """use_cpu_initialization=False on a CPU machine: Megatron's layers go to the "current device" (the
    CPU); device='cpu' must not change one value, and GDN's own parameters keep HF's init."""
    old, new = _build(seed=3), _build(seed=3, device="cpu")
    assert _layout(new) == _layout(old)
    for (n, a), b in zip(old.state_dict().items(), new.state_dict().values()):
        if torch.is_tensor(a):
            assert torch.equal(a, b), n
    gdn = [m for m in new.modules() if isinstance(m, GatedDeltaNet)]
    assert len(gdn) == 3
    for m in gdn:  # reset_parameters: A = exp(A_log) ~ U(0, 16), dt_bias = 1
        A = m.A_log.detach().float().exp()
        assert ((A > 0) & (A <= 16)).all() and A.std() > 0
        assert torch.equal(m.dt_bias.detach(), torch.ones_like(m.dt_bias))
    assert not torch.equal(gdn[0].A_log, gdn[1].A_log)


def test_device_it_cannot_honour_is_one_error():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            _build(device="cuda")
    with pytest.raises(ValueError, match="use_cpu_initialization=True"):
        _build(device="meta", use_cpu_initialization=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_build_matches_the_old_build_moved_to_the_gpu():
    old = _build().cuda()  # fp32: an atomics-order difference stays far below the tolerance
    new = _build(device="cuda")
    assert {p.device.type for p in new.parameters()} == {"cuda"}
    assert {b.device.type for b in new.buffers()} <= {"cuda"}
    assert _layout(new) == _layout(old)
    new.load_state_dict(old.state_dict())
    torch.testing.assert_close(_logits(new, "cuda"), _logits(old, "cuda"), **_TOL["cuda"])
