"""`training.fixes.fuse_torch_adam`: megatron-core's torch AdamW fallback switched to torch's fused kernel.

The reference is the AdamW megatron-core builds without TE/Apex (`torch.optim.AdamW` with its defaults:
foreach), fed the same fp32 masters and gradients; torch has the fused kernel on CPU too.
"""

from types import SimpleNamespace

import torch

from nemo_qwen3_next.training import fixes


def _run(fuse_devices, n=4):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((64, 32), (32,), (3, 5, 7))]
    # megatron-core 0.15's kwargs (optimizer/__init__.py): lr, weight_decay, betas, eps
    opt = torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}],
                            lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    switched = fixes.fuse_torch_adam(SimpleNamespace(optimizer=opt), devices=fuse_devices)  # Megatron's wrapper
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return switched, [p.detach().clone() for p in params], opt


def test_fused_adamw_equals_the_foreach_one_megatron_builds():
    n_ref, ref, _ = _run(fuse_devices=("cuda",))  # the default policy: CPU parameters keep foreach
    n_got, got, opt = _run(fuse_devices=("cpu",))
    assert n_ref == 0 and n_got == 2 and all(gr["fused"] and not gr["foreach"] for gr in opt.param_groups)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ref[0], _run(fuse_devices=("cuda",), n=3)[1][0])  # the steps did move the weights


def test_only_torch_adam_and_the_build_hook_once():
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    assert fixes.fuse_torch_adam(sgd, devices=("cpu",)) == 0 and not sgd.param_groups[0].get("fused")
    from megatron.core import optimizer as mopt

    fixes.use_fused_torch_adam()
    hooked = mopt._get_megatron_optimizer_based_on_param_groups
    fixes.use_fused_torch_adam()
    assert hooked is mopt._get_megatron_optimizer_based_on_param_groups and hooked._qwen3_next_fixed


def _clip_run(fold: bool, max_norm: float, steps: int = 3):
    """`steps` clipped AdamW steps; fold=False: megatron-core's clip (gradients scaled in place), then the
    fused step; fold=True: the clip factor handed to the fused kernel as grad_scale."""
    from megatron.core.optimizer import clip_grads, optimizer as mopt

    import nemo_qwen3_next as nq

    fixes.apply()  # CPU: megatron's clip asserts CUDA gradients without the CPU workarounds
    nq.init_distributed()  # its norm all-reduces over the (one-process) model-parallel group
    fixes.fold_clip_into_fused_adam()
    clip = mopt.clip_grad_by_total_norm_fp32 if fold else mopt.clip_grad_by_total_norm_fp32.__wrapped__
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((64, 32), (32,), (3, 5, 7))]
    opt = torch.optim.AdamW([{"params": params}], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    assert fixes.fuse_torch_adam(SimpleNamespace(optimizer=opt), devices=("cpu",)) == 1
    norms = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 3
        norm = clip_grads.get_grad_norm_fp32([p.grad for p in params])
        norms.append(norm)
        clip(params, max_norm, norm)
        opt.step()
    return [p.detach().clone() for p in params], opt, norms


def test_clip_folded_into_fused_adam_equals_clip_then_step():
    for max_norm in (1.0, 1e6):  # clipped every step / never clipped
        ref, _, norms = _clip_run(False, max_norm)
        got, opt, _ = _clip_run(True, max_norm)
        assert (min(norms) > max_norm) == (max_norm == 1.0)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)
        assert (opt.grad_scale is None) == (max_norm > max(norms))  # set each step, None under the limit
    unfused = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    assert fixes._fused_owner(unfused.param_groups[0]["params"]) is None  # other optimizers: megatron's path
