"""`training.fixes.defer_grad_nan_check`: megatron-core DDP's NaN/Inf gradient check without a host sync
in the step (raised before the next optimizer step). Reference: megatron-core's own per-bucket check (the
unpatched `check_grads`) on the same model."""

import pytest
import torch

import nemo_qwen3_next as nq
from nemo_qwen3_next.config import qwen3_next_tiny_5m
from nemo_qwen3_next.training import fixes


@pytest.fixture(scope="module")
def ddp_model():
    fixes.apply()  # on CPU also the CPU workarounds Megatron's DDP needs (as pretrain.py)
    nq.init_distributed()
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    cfg = qwen3_next_tiny_5m()
    torch.manual_seed(0)
    model = nq.build_model(cfg, backend="local")
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(
        check_for_nan_in_grad=True, grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=False), model)
    return ddp, model, cfg


def _backward(ddp, model, cfg, scale):
    ddp.zero_grad_buffer()
    ids = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(16)[None]
    (model(ids, pos, None, labels=ids).mean() * scale).backward()


@pytest.mark.parametrize("kind", ["NaN", "Inf"])
def test_bad_gradients_raise_megatron_message_before_the_optimizer_step(ddp_model, kind):
    from megatron.core.distributed import param_and_grad_buffer as pgb

    ddp, model, cfg = ddp_model
    assert fixes.defer_grad_nan_check()
    _backward(ddp, model, cfg, 1.0)
    list(model.parameters())[-1].main_grad.view(-1)[3] = float("nan" if kind == "NaN" else "inf")
    ddp.finish_grad_sync()  # records the verdict; the loop's post-backward work goes on
    params = list(model.parameters())
    for p in params:
        p.grad = p.main_grad.to(p.dtype)
    opt = torch.optim.SGD(params, lr=0.1)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError) as ours:
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, params))  # no update from bad gradients
    for p in params:
        p.grad = None
    # megatron-core's own check on the same gradients names the same first bucket and kind
    stock = pgb._ParamAndGradBucketGroup.check_grads.__wrapped__
    with pytest.raises(RuntimeError) as ref:
        for g in ddp.bucket_groups:
            stock(g, True, False)
    msg = str(ours.value)
    assert msg.endswith("(checked at finish_grad_sync, raised before the optimizer step)")  # our one deferred check raised, not megatron's
    assert f"found {kind} in local grad norm for bucket #" in msg and "\n" not in msg
    assert msg.split("bucket #")[1].split()[0] == str(ref.value).split("bucket #")[1].split()[0]


def test_check_grads_only_records_until_finish(ddp_model):
    ddp, model, cfg = ddp_model
    _backward(ddp, model, cfg, 1.0)
    list(model.parameters())[0].main_grad.view(-1)[0] = float("nan")
    g = ddp.bucket_groups[0]
    g.check_grads(True, False)  # megatron's would raise here, reading the norm on the host
    assert g._qwen3_next_grad_norms is not None and g._qwen3_next_grad_norms.shape == (len(g.buckets),)
    g._qwen3_next_grad_norms = None


def test_unread_verdict_raises_at_the_next_finish_grad_sync(ddp_model):
    ddp, model, cfg = ddp_model
    _backward(ddp, model, cfg, 1.0)
    list(model.parameters())[0].main_grad.view(-1)[0] = float("inf")
    ddp.finish_grad_sync()  # no optimizer step follows: the next step's finish_grad_sync reads it
    _backward(ddp, model, cfg, 1.0)
    with pytest.raises(RuntimeError, match="found Inf in local grad norm"):
        ddp.finish_grad_sync()
    fixes.raise_pending_grad_nan()  # the new (finite) verdict: nothing to raise


def test_finite_gradients_pass_and_leave_nothing_pending(ddp_model):
    ddp, model, cfg = ddp_model
    _backward(ddp, model, cfg, 1.0)
    ddp.finish_grad_sync()
    fixes.raise_pending_grad_nan()
    assert fixes._PendingGradCheck.norms is None
    assert all(getattr(g, "_qwen3_next_grad_norms", None) is None for g in ddp.bucket_groups)
    grads = [p.main_grad for p in model.parameters()]
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
