"""Dispatch seam for the gated delta rule: fla's Triton kernels on GPU, plain torch elsewhere.

Everything above this function (the GDN layer, context parallelism, generation) calls
:func:`gated_delta_rule` and never imports fla directly, so CPU machines (no triton) keep
working through the references in :mod:`.gated_delta_rule_ref`.

fla facts this relies on (``fla.ops.gated_delta_rule``, fla-core 0.2-0.5):

* ``chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None,
  output_final_state=False, use_qk_l2norm_in_kernel=False, cu_seqlens=None)`` and
  ``fused_recurrent_gated_delta_rule(...)`` with the same keywords; layouts are the ones used
  here (``[B, T, H, *]``, state ``[N, H, K, V]`` fp32, ``g`` a log decay, varlen with ``B == 1``).
* ``fused_recurrent`` has long supported ``Hv > Hk`` natively, but ``chunk`` only gained it
  in recent fla, and older releases' ``chunk`` assumes q, k, v share one head count.
* fla-core >= 0.6 (recognised by ``use_beta_sigmoid_in_kernel`` in the signature) has, in both
  ``chunk`` and ``fused_recurrent``: grouped value heads (``Hv > Hk``, "GVA"), the GDN decay
  computed in-kernel from the raw gate input (``use_gate_in_kernel=True, A_log, dt_bias``:
  ``g = -exp(A_log) * softplus(a + dt_bias)`` fused with the chunk cumsum, with its backward), and
  ``use_beta_sigmoid_in_kernel``.  With such an fla we hand it q/k with ``Hk`` heads and the raw
  gate/beta inputs; with an older one we compute ``g``/``beta`` in torch and ``repeat_interleave``
  q/k to ``Hv`` heads (correct on every version; autograd sums the grads back).
* ``fused_recurrent`` has no backward; it is for decoding only.  ``chunk`` uses chunk size 64
  internally, so ``chunk_size`` only affects the reference.

FlashQLA (``pip install flash-qla``, Qwen's fused TileLang forward/backward for Hopper and Blackwell,
K = V = 128 only): when importable, the chunked training path (no initial/final state) calls
``flash_qla.chunk_gated_delta_rule`` directly, with the gate and ``sigmoid(beta)`` computed in torch
(FlashQLA takes the log decay and post-sigmoid beta; it L2-normalises q/k itself and handles grouped
value heads; with ``B == 1`` it splits long sequences across SMs, "intra-card CP").  Choose with the
environment variable ``QWEN3_NEXT_GDN_KERNEL`` (or :data:`CHUNK_KERNEL`): ``auto`` (default: FlashQLA
where it applies, else fla), ``fla`` or ``flash_qla`` (raise if it cannot be used).
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import flash_qla_states, own_kernels
from .gated_delta_rule_ref import chunk_gated_delta_rule_ref, recurrent_gated_delta_rule_ref
from .usage import record

__all__ = ["gated_delta_rule", "gdn_gate", "FLA_INSTALL_HINT"]

FLA_INSTALL_HINT = (
    "the fla package (flash-linear-attention) is required for backend='fla'. "
    "Install it with `pip install fla-core` or `pip install 'flash-linear-attention<0.6'` "
    "(it needs triton and a GPU)."
)

_BACKENDS = ("auto", "torch", "fla")
_CHUNK_KERNELS = ("auto", "fla", "flash_qla")
#: which chunked kernel the fla backend uses for training-shaped calls (see the module docstring)
CHUNK_KERNEL = os.environ.get("QWEN3_NEXT_GDN_KERNEL", "auto")
#: FlashQLA's training calls keep the per-chunk states from forward for backward instead of recomputing them
#: (`flash_qla_states`: one kernel less, T/64 * Hv * 128^2 bf16 more per layer); "0" recomputes as FlashQLA does
KEEP_CHUNK_STATES = os.environ.get("QWEN3_NEXT_GDN_KEEP_STATES", "1")


@functools.lru_cache(maxsize=None)
def _load_fla():
    """Import fla lazily (it imports triton at module load). Returns (chunk, recurrent) or the error."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except Exception as e:  # ImportError, or triton failing to initialise without a driver
        return e
    return chunk_gated_delta_rule, fused_recurrent_gated_delta_rule


@functools.lru_cache(maxsize=None)
def _fla_fused_features() -> bool:
    """fla's chunk kernel takes grouped value heads and computes gate and beta in-kernel (fla-core >= 0.6)."""
    fns = _load_fla()
    if isinstance(fns, Exception):
        return False
    try:
        return "use_beta_sigmoid_in_kernel" in inspect.signature(fns[0]).parameters
    except (TypeError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def _load_flash_qla():
    """Import FlashQLA lazily (it imports TileLang and queries the GPU). Returns the function or the error."""
    try:
        from flash_qla import chunk_gated_delta_rule
    except Exception as e:  # ImportError, or no supported GPU
        return e
    return chunk_gated_delta_rule


def _flash_qla_reason(q, k, v, initial_state, output_final_state, use_recurrent) -> Optional[str]:
    """Why FlashQLA cannot run this call, or None if it can."""
    if use_recurrent:
        return "recurrent (decoding) kernel requested"
    if initial_state is not None or output_final_state:
        return "initial/final states are kept on fla's path"
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] not in (9, 10):
        return "needs an SM90/SM100 GPU"
    if q.shape[-1] != 128 or v.shape[-1] != 128:
        return f"needs K = V = 128, got K={q.shape[-1]}, V={v.shape[-1]}"
    if v.dtype not in (torch.bfloat16, torch.float16):
        return f"needs bf16/fp16, got {v.dtype}"
    fn = _load_flash_qla()
    if isinstance(fn, Exception):
        return f"flash_qla is not importable ({fn!r})"
    return None


def chunk_kernel_for(q, k, v, *, initial_state=None, output_final_state=False, use_recurrent=False) -> str:
    """The kernel :func:`gated_delta_rule` picks for these CUDA inputs: ``"flash_qla"`` or ``"fla"``."""
    if CHUNK_KERNEL not in _CHUNK_KERNELS:
        raise ValueError(f"QWEN3_NEXT_GDN_KERNEL must be one of {_CHUNK_KERNELS}, got {CHUNK_KERNEL!r}")
    if CHUNK_KERNEL == "fla":
        return "fla"
    why = _flash_qla_reason(q, k, v, initial_state, output_final_state, use_recurrent)
    if why is None:
        return "flash_qla"
    if CHUNK_KERNEL == "flash_qla":
        raise RuntimeError(f"QWEN3_NEXT_GDN_KERNEL=flash_qla, but FlashQLA cannot run this call: {why}")
    return "fla"


def gdn_gate(a: torch.Tensor, A_log: torch.Tensor, dt_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Qwen3-Next's log decay ``-exp(A_log) * softplus(a + dt_bias)`` in fp32 (HF's expression)."""
    x = a.float() if dt_bias is None else a.float() + dt_bias
    return -A_log.float().exp() * F.softplus(x)


def _kernel_cu_seqlens(q, Hk: int, Hv: int, cu_seqlens):
    """Checks shared by the kernel paths; returns `cu_seqlens` as the int64 device tensor they take."""
    if Hv % Hk != 0:
        raise ValueError(f"num value heads ({Hv}) must be a multiple of num key heads ({Hk})")
    if cu_seqlens is None:
        return None
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1 (packed sequences); got B={q.shape[0]}")
    return cu_seqlens.to(device=q.device, dtype=torch.long)


def _require_fla():
    fns = _load_fla()
    if isinstance(fns, Exception):
        raise ImportError(FLA_INSTALL_HINT) from fns
    return fns


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    use_recurrent: bool = False,
    chunk_size: int = 64,
    use_qk_l2norm: bool = False,
    A_log: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    beta_is_logits: bool = False,
    backend: str = "auto",
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gated delta rule over ``[B, T, H, *]`` inputs.

    Args:
        q, k: ``[B, T, Hk, K]``, expected already L2-normalised unless ``use_qk_l2norm``.
        v: ``[B, T, Hv, V]`` with ``Hv % Hk == 0`` (value head j uses key head ``j // (Hv//Hk)``).
        g: ``[B, T, Hv]`` log decay (fp32 recommended); beta: ``[B, T, Hv]`` write strength.
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[N, Hv, K, V]`` fp32; ``N = B``, or the number of documents with ``cu_seqlens``.
        output_final_state: also return the ``[N, Hv, K, V]`` state after the last token.
        cu_seqlens: 1-D int32/int64 document offsets for packed input (requires ``B == 1``);
            the state restarts (from ``initial_state[n]`` or zeros) at every document.
        use_recurrent: token-by-token kernel (decoding); otherwise the chunked one (prefill/training).
        chunk_size: chunk length of the torch reference (fla uses 64 internally).
        use_qk_l2norm: L2-normalise q and k inside (in fp32), like HF's ``use_qk_l2norm_in_kernel``.
        A_log, dt_bias: ``[Hv]``; when ``A_log`` is given, ``g`` is the *raw* gate input ``a`` and the
            log decay is ``-exp(A_log) * softplus(a + dt_bias)`` (:func:`gdn_gate`), fused into the
            kernel where fla supports it.
        beta_is_logits: ``beta`` holds logits; ``sigmoid(beta)`` is applied inside (in-kernel on fla).
        backend: ``"auto"`` (fla for CUDA tensors when importable, else torch), ``"torch"``, ``"fla"``.

    Returns:
        ``(o, final_state)``: ``o`` is ``[B, T, Hv, V]`` in ``v.dtype``; ``final_state`` is fp32
        (the compute dtype for the reference) or ``None`` when not requested.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    use_fla = backend == "fla"
    if backend == "auto" and q.is_cuda:
        use_fla = not isinstance(_load_fla(), Exception)
        if not use_fla:
            warnings.warn(
                "gated_delta_rule: fla is not importable, using the (slow) torch reference on CUDA. "
                + FLA_INSTALL_HINT,
                stacklevel=2,
            )

    if use_fla and chunk_kernel_for(q, k, v, initial_state=initial_state, output_final_state=output_final_state,
                                    use_recurrent=use_recurrent) == "flash_qla":
        record("gated_delta_rule", "flash_qla")
        return _flash_qla_call(q, k, v, g, beta, scale=scale, cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm,
                               A_log=A_log, dt_bias=dt_bias, beta_is_logits=beta_is_logits)

    # fused_recurrent (decoding) keeps the gate/beta in torch and the expanded heads: the path that
    # was checked against the chunk kernel on the GPU machine.
    fused = use_fla and not use_recurrent and _fla_fused_features()
    if not fused:  # gate and beta in torch, exactly as the layer has always computed them
        if A_log is not None:
            g = gdn_gate(g, A_log, dt_bias)
        if beta_is_logits:
            beta = beta.sigmoid()

    if not use_fla:
        kwargs = dict(
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
            use_qk_l2norm=use_qk_l2norm,
        )
        record("gated_delta_rule", "torch_recurrent" if use_recurrent else "torch_chunk")
        if use_recurrent:
            return recurrent_gated_delta_rule_ref(q, k, v, g, beta, **kwargs)
        return chunk_gated_delta_rule_ref(q, k, v, g, beta, chunk_size=chunk_size, **kwargs)

    chunk_fn, recurrent_fn = _require_fla()
    Hk, Hv = k.shape[2], v.shape[2]
    cu_seqlens = _kernel_cu_seqlens(q, Hk, Hv, cu_seqlens)
    if scale is None:
        scale = k.shape[-1] ** -0.5
    # fla wants q, k, v in one dtype; the caller's normalised q/k may be fp32 next to bf16 v.
    q, k = q.to(v.dtype), k.to(v.dtype)
    extra = {}
    if fused:  # see module docstring: grouped heads, gate and beta sigmoid inside fla's kernels
        if A_log is not None:
            extra.update(use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias)
        if beta_is_logits:
            extra.update(use_beta_sigmoid_in_kernel=True)
    elif Hv != Hk:  # older fla: not every chunk kernel handles grouped value heads
        q = q.repeat_interleave(Hv // Hk, dim=2)
        k = k.repeat_interleave(Hv // Hk, dim=2)
    if initial_state is not None:
        initial_state = initial_state.to(torch.float32)
    if use_recurrent:  # fused_recurrent has no input guard: it reads strided views as if contiguous
        q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))
    fn = recurrent_fn if use_recurrent else chunk_fn
    record("gated_delta_rule", "fla_recurrent" if use_recurrent else "fla_chunk")
    # Keywords only: fla-core 0.6's fused_recurrent takes (q, k, v, g, gk, gv, beta, ...), so a positional
    # beta lands in gk (a per-key decay it then reads out of bounds: NaN output).
    o, final_state = fn(
        q=q,
        k=k,
        v=v,
        g=g,
        beta=beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        use_qk_l2norm_in_kernel=use_qk_l2norm,
        **extra,
    )
    return o.to(v.dtype), (final_state if output_final_state else None)


def _keep_chunk_states(*inputs) -> bool:
    """Whether this FlashQLA call keeps its chunk states for backward (`flash_qla_states`): a backward will run,
    the switch is on and the installed FlashQLA is one that path was checked against."""
    return (own_kernels.switch_on("QWEN3_NEXT_GDN_KEEP_STATES", KEEP_CHUNK_STATES) and torch.is_grad_enabled()
            and any(t.requires_grad for t in inputs) and flash_qla_states.available())


def _flash_qla_call(q, k, v, g, beta, *, scale, cu_seqlens, use_qk_l2norm, A_log, dt_bias, beta_is_logits):
    """FlashQLA's chunked forward/backward; the gate (fp32) and sigmoid(beta) in torch, as it wants them."""
    fn = _load_flash_qla()
    Hk, Hv = k.shape[2], v.shape[2]
    cu_seqlens = _kernel_cu_seqlens(q, Hk, Hv, cu_seqlens)
    if A_log is not None:
        g = gdn_gate(g, A_log, dt_bias)
    if beta_is_logits:
        beta = beta.sigmoid()
    q, k = q.to(v.dtype), k.to(v.dtype)
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    g, beta = g.float(), beta.to(v.dtype)
    if _keep_chunk_states(q, k, v, g, beta):
        record("gdn_chunk_states", "kept")
        o = flash_qla_states.chunk_gated_delta_rule_kept_states(q, k, v, g, beta, scale=scale, cu_seqlens=cu_seqlens,
                                                                use_qk_l2norm=use_qk_l2norm)
        return o.to(v.dtype), None
    o, _ = fn(
        q=q,
        k=k,
        v=v,
        g=g,
        beta=beta,
        scale=scale,
        use_qk_l2norm_in_kernel=use_qk_l2norm,
        cu_seqlens=cu_seqlens,
    )
    return o.to(v.dtype), None
