"""`training.fixes.foreach_l2_norm` / `foreach_scale` against megatron-core's own local fallbacks
(`megatron.core.utils.local_multi_tensor_l2_norm` / `local_multi_tensor_scale`), the reference they replace."""

import torch
from megatron.core import utils as mutils

from nemo_qwen3_next.training import fixes


def _tensors(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in ((64, 32), (7,), (3, 5, 11), (1,))]


def test_l2_norm_equals_megatron_fallback():
    ts = _tensors()
    ours, _ = fixes.foreach_l2_norm(2048 * 32, None, [ts], False)
    ref = torch.sqrt(sum((t.double() ** 2).sum() for t in ts))
    assert ours.shape == (1,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref.reshape(1), rtol=1e-6, atol=0)
    if torch.cuda.is_available():  # megatron's fallback puts its result on CUDA
        return
    try:
        theirs, _ = mutils.local_multi_tensor_l2_norm(2048 * 32, None, [ts], False)
    except (AssertionError, RuntimeError):  # its device="cuda" needs CUDA (or our CPU patch)
        return
    torch.testing.assert_close(ours, theirs.cpu(), rtol=1e-6, atol=0)


def test_scale_in_place_and_copy_equal_megatron_fallback():
    a, b = _tensors(), _tensors()
    fixes.foreach_scale(0, None, [a, a], 0.37)  # clipping: dst is src
    mutils.local_multi_tensor_scale(0, None, [b, b], 0.37)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    for scale in (1.0, 0.5):  # main (fp32) -> model (bf16) parameter copy
        src = _tensors(seed=1)
        ours, ref = _tensors(torch.bfloat16, seed=2), _tensors(torch.bfloat16, seed=2)
        fixes.foreach_scale(0, None, [src, ours], scale)
        mutils.local_multi_tensor_scale(0, None, [src, ref], scale)
        for x, y in zip(ours, ref):
            assert x.dtype == torch.bfloat16
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_replaces_only_the_local_fallbacks_once():
    from megatron.core.optimizer import clip_grads, optimizer as mopt

    fixes.use_foreach_multi_tensor_ops()
    for mod, name in ((clip_grads, "l2_norm_impl"), (clip_grads, "multi_tensor_scale_impl"),
                      (mopt, "multi_tensor_scale_impl")):
        impl = getattr(mod, name)
        assert impl not in (mutils.local_multi_tensor_l2_norm, mutils.local_multi_tensor_scale)
    assert fixes.use_foreach_multi_tensor_ops() == 0  # idempotent
