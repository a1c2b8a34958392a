"""FlashQLA's chunked gated delta rule with the per-chunk states kept from forward for backward.

``flash_qla.chunk_gated_delta_rule`` (0.1.3) saves q, k, v, the gate cumsum, beta and the KKT solve, and its
backward first re-runs the state recurrence (``fused_gdr_h``: every chunk's ``[K, V]`` state) before the fused
backward kernel reads those states. Its forward kernel can store the very same states as it goes
(``output_h=True``, same initial states, same layout), so this autograd function asks for them and hands them
to the backward, which skips the recurrence: one kernel less per layer and step (0.47 of ~14.6 ms at B=1
T=32768 on H100, Dec 06 profile), for ``T/64 * Hv * 128 * 128`` bf16 more activation memory per layer
(64 MiB at T=4096, Hv=32; under ``linear_attention_recompute`` only while that layer's backward runs).

Everything else is FlashQLA's own code path, called in its order: the same intra-card CP decision, cache and
kernels, so the gradients match ``flash_qla.chunk_gated_delta_rule``'s (GPU test:
``tests/test_gpu_gdn.py::test_flash_qla_kept_states_match_recompute``). It reaches into FlashQLA's module for
the backward's pieces, so it is used only with a FlashQLA whose version it was checked against
(:data:`CHECKED_VERSIONS`); any other falls back to the public function. ``QWEN3_NEXT_GDN_KEEP_STATES=0``
(or ``gated_delta_rule.KEEP_CHUNK_STATES = "0"``) recomputes the states as FlashQLA does.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

#: FlashQLA versions whose forward/backward internals this module mirrors
CHECKED_VERSIONS = ("0.1.3",)
#: the names of ``flash_qla.ops.gated_delta_rule.chunk`` it calls
REQUIRED = ("chunk_gated_delta_rule_fwd", "cp_preprocess_bwd", "fused_gdr_bwd", "group_reduce_vector",
            "chunk_local_cumsum", "_auto_intra_cp_context", "CHUNK_SIZE")


@functools.lru_cache(maxsize=None)
def _internals():
    """FlashQLA's chunk module and l2norm pieces, or None where the version is unchecked or a name is missing."""
    try:
        import flash_qla
        from flash_qla.ops.gated_delta_rule import chunk as mod
        from flash_qla.utils import l2norm_bwd, l2norm_fwd
    except Exception:  # not importable here (no GPU / TileLang): the caller never gets this far
        return None
    if getattr(flash_qla, "__version__", None) not in CHECKED_VERSIONS or not all(hasattr(mod, n) for n in REQUIRED):
        return None
    if mod.fused_gdr_bwd is None:  # an architecture without FlashQLA's backward
        return None
    return mod, l2norm_fwd, l2norm_bwd


def available() -> bool:
    """Whether the kept-states path can run with the installed FlashQLA."""
    return _internals() is not None


class _KeptStates(torch.autograd.Function):
    """FlashQLA forward with ``output_h=True``; backward = FlashQLA's minus its state recomputation.

    No initial or final state (the training path: `gated_delta_rule` sends those to fla)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, q, k, v, g, beta, scale: float, cu_seqlens: Optional[torch.Tensor], use_qk_l2norm: bool):
        mod, l2norm_fwd, _ = _internals()
        q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))  # FlashQLA's input_guard does the same
        q_rstd = k_rstd = None
        if use_qk_l2norm:
            q, q_rstd = l2norm_fwd(q)
            k, k_rstd = l2norm_fwd(k)
        cp_context = mod._auto_intra_cp_context(k, v, cu_seqlens, mod.CHUNK_SIZE, True, True)
        g, A, o, h, _, cp_cache = mod.chunk_gated_delta_rule_fwd(
            q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=None, cu_seqlens=cu_seqlens,
            output_final_state=False, output_h=True, auto_cp=True, enable_fwd_cp_cache=True,
            cp_context=cp_context, is_train=True)
        ctx.save_for_backward(q, k, q_rstd, k_rstd, v, g, beta, A, h)
        ctx.scale, ctx.use_qk_l2norm, ctx.cp_context, ctx.cp_cache = scale, use_qk_l2norm, cp_context, cp_cache
        return o.to(q.dtype)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, do):
        mod, _, l2norm_bwd = _internals()
        q, k, q_rstd, k_rstd, v, g, beta, A, h = ctx.saved_tensors
        do = do.contiguous()
        cp = ctx.cp_context
        # chunk_gated_delta_rule_bwd without its fused_gdr_h: the states come from the forward
        _, dht = mod.cp_preprocess_bwd(cp, q=q, k=k, v=v, a=A, g=g, beta=beta, do=do, dht=None, scale=ctx.scale,
                                       initial_state=None, state_v_first=False, cp_cache=ctx.cp_cache)
        dq, dk, dv, dg, db, _ = mod.fused_gdr_bwd(
            q=q, k=k, v=v, a=A, g=g, b=beta, do=do, dht=dht, h=h, scale=ctx.scale,
            cu_seqlens=cp.intra_cp_cu_seqlens if cp.is_intra else cp.cu_seqlens, state_v_first=False)
        Hg, H = k.shape[-2], v.shape[-2]
        if Hg < H:
            dq, dk = mod.group_reduce_vector(dq, Hg), mod.group_reduce_vector(dk, Hg)
        dg = mod.chunk_local_cumsum(dg, chunk_size=A.shape[-1], reverse=True, cu_seqlens=cp.cu_seqlens,
                                    zero_last_chunk=True)
        if ctx.use_qk_l2norm:
            dq, dk = l2norm_bwd(q, q_rstd, dq), l2norm_bwd(k, k_rstd, dk)
        return dq.to(q), dk.to(k), dv.to(v), dg.to(g), db.to(beta), None, None, None


@torch.compiler.disable  # TileLang kernels and host-side CP decisions, as FlashQLA's own entry point
def chunk_gated_delta_rule_kept_states(q, k, v, g, beta, *, scale: float, cu_seqlens=None, use_qk_l2norm=False):
    """``flash_qla.chunk_gated_delta_rule(q, k, v, g, beta, scale=, cu_seqlens=, use_qk_l2norm_in_kernel=)``
    (bf16 q/k/v/beta, fp32 log-decay g, no initial/final state) with the chunk states kept for backward."""
    return _KeptStates.apply(q, k, v, g, beta, scale, cu_seqlens, use_qk_l2norm)
