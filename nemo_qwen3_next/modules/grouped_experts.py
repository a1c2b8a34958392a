"""Routed experts without TransformerEngine: `SequentialMLP`'s parameters, optionally grouped GEMMs.

megatron-core's local `SequentialMLP` runs each expert's MLP in a Python loop: with many small
experts (64 per layer in our ~1B config, 512 in 80B-A3B) a training step becomes launch-bound
(H200: ~10 TFLOP/s/GPU for the ~1B model, `benchmarks/results/h200x2_pretrain`). The legacy
`GroupedMLP` needs the `grouped_gemm` package and another parameter layout; `TEGroupedMLP` needs TE.

`GroupedSequentialMLP` keeps `SequentialMLP`'s parameters (`local_experts.{i}.linear_fc{1,2}`), so
checkpoints, HF conversion and sharding are unchanged, and when grouped (see below) runs both projections of all local experts as one `torch._grouped_mm` each: the per-expert weights are
stacked (one copy of the layer's expert weights, cheap next to the GEMMs) and gradients flow back
to each expert's own parameters, so DDP's per-parameter hooks work as before.

``QWEN3_NEXT_MOE_EXPERTS``: ``auto`` (default) runs the grouped GEMMs where torch has a fast kernel for
them (CUDA, compute capability >= 9.0, bf16, 16-byte-aligned widths) and the loop elsewhere (CPU,
fp32, older GPUs); ``grouped_mm`` forces them (and fails loudly if the config cannot use them);
``sequential`` forces the loop. Measured on H200 (`benchmarks/results/h200_moe_*.json`): the 80B-A3B
MoE block (512 experts, top-10), B=8 T=4096, forward+backward 309 ms looped, 40 ms grouped; the ~1B
model trains at 24.1K tokens/s instead of 5.0K on one GPU (`benchmarks/results/h200x2_pretrain`).
Checked against HF and the loop on CPU (fp32) in `tests/test_grouped_experts.py`.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

from ..ops.usage import record

IMPLS = ("auto", "sequential", "grouped_mm")


def experts_impl() -> str:
    impl = os.environ.get("QWEN3_NEXT_MOE_EXPERTS", "auto")
    if impl not in IMPLS:
        raise ValueError(f"QWEN3_NEXT_MOE_EXPERTS={impl!r}; use one of {IMPLS}")
    return impl


def grouped_mm_unsupported(config) -> str:
    """Why the grouped path cannot reproduce `SequentialMLP` for this config ('' when it can)."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm (needs torch >= 2.8)"
    if config.fp8:
        return "fp8 experts (use TransformerEngine's TEGroupedMLP)"
    if config.add_bias_linear:
        return "expert biases (add_bias_linear=True)"
    if not (config.gated_linear_unit and config.activation_func is F.silu):
        return "experts other than SwiGLU (gated_linear_unit with silu)"
    if getattr(config, "activation_func_clamp_value", None) is not None or getattr(config, "glu_linear_offset", 0):
        return "clamped / offset GLU activations"
    if getattr(config, "delay_wgrad_compute", False):
        return "delay_wgrad_compute"
    return ""


def auto_uses_grouped(config, ffn_local: int, device: torch.device, dtype: torch.dtype) -> bool:
    """``auto``'s choice: grouped GEMMs only where torch runs them as one fast CUDA kernel.

    torch's CUDA `_grouped_mm` targets sm90+ in bf16 with 16-byte-aligned rows; elsewhere (CPU, fp32,
    older GPUs) it is a fallback or unsupported, and the loop is the known-good path.
    """
    if grouped_mm_unsupported(config) or device.type != "cuda" or dtype != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(device) < (9, 0):
        return False
    return config.hidden_size % 8 == 0 and ffn_local % 8 == 0  # ffn_local: this rank's F/tp


@functools.lru_cache(maxsize=None)
def _load_fla_swiglu():
    try:
        from fla.modules.activations import swiglu as fn
    except Exception:
        return None
    return fn


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``: fla's fused kernel on CUDA (one pass each way, strided rows read in place;
    fp32 inside, one rounding), the torch expression elsewhere."""
    fn = _load_fla_swiglu() if gate.is_cuda else None
    if fn is None:
        return F.silu(gate) * up
    return fn(gate, up)


class GroupedSequentialMLP(SequentialMLP):
    """`SequentialMLP` whose forward can run all local experts as two grouped GEMMs (see module doc)."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        self.impl = experts_impl()
        self._auto: dict = {}
        if self.impl == "grouped_mm":
            why = grouped_mm_unsupported(config)
            if why:
                raise ValueError(
                    f"QWEN3_NEXT_MOE_EXPERTS=grouped_mm does not support {why}; unset it to use the loop."
                )

    def _grouped(self, x: torch.Tensor) -> bool:
        if self.num_local_experts == 1:
            return False
        if self.impl == "auto":  # decided once per device and dtype (a model may run on CPU, then GPU)
            key = (x.device, x.dtype)
            if key not in self._auto:
                ffn_local = self.local_experts[0].linear_fc2.weight.shape[-1]
                self._auto[key] = auto_uses_grouped(self.config, ffn_local, x.device, x.dtype)
            return self._auto[key]
        return self.impl == "grouped_mm"

    def _stacked_weights(self):
        """All local experts' fc1 / fc2 weights as two stacked tensors.

        With autograd on they are stacked anew each call (the gradient flows back to each expert's
        own parameter). Without it (generation, evaluation) the stack is kept and reused until a
        weight changes: decode steps at the reduced widths would otherwise copy ~1.6 GB of expert
        weights per token. A weight's in-place update (optimizer step, `load_state_dict`) bumps its
        version counter, which is part of the key.
        """
        ws1 = [e.linear_fc1.weight for e in self.local_experts]
        ws2 = [e.linear_fc2.weight for e in self.local_experts]
        if torch.is_grad_enabled():
            self._stack_cache = None
            return torch.stack(ws1), torch.stack(ws2)
        key = tuple((w.data_ptr(), w._version) for w in ws1 + ws2)
        cached = getattr(self, "_stack_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, torch.stack(ws1), torch.stack(ws2))
            self._stack_cache = cached
        return cached[1], cached[2]

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        x, probs = permuted_local_hidden_states, permuted_probs
        if not self._grouped(x):
            record("moe_experts", "sequential")
            return super().forward(x, tokens_per_expert, probs)
        record("moe_experts", "grouped_mm")
        if self.config.moe_apply_probs_on_input:  # as the parent: scale the input, then no weights
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = None
        # group ends; int32 on the tokens' device (no host sync, unlike the parent's .tolist())
        offs = torch.cumsum(torch.as_tensor(tokens_per_expert, device=x.device), 0).to(torch.int32)
        w1, w2 = self._stacked_weights()  # [E, 2F/tp, H], [E, H, F/tp]
        h = torch._grouped_mm(x, w1.to(x.dtype).transpose(1, 2), offs=offs)  # [T, 2F/tp]
        gate, up = torch.chunk(h, 2, dim=-1)  # megatron's fc1 holds [gate; up] on every TP rank
        act = swiglu(gate, up)
        if probs is not None:
            act = (act * probs.unsqueeze(-1)).to(x.dtype)  # same order and dtypes as megatron's MLP
        out = torch._grouped_mm(act, w2.to(x.dtype).transpose(1, 2), offs=offs)  # [T, H]
        return out, None
