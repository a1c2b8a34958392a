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

``config.moe_stacked_experts``: the layer holds one Parameter per projection, ``weight1``
[E_local, 2F/tp, H] and ``weight2`` [E_local, H, F/tp], instead of 2·E_local per-expert ones: no
stack per step, and Megatron DDP / the optimizer see 2 parameters per MoE layer (with 64 experts per
layer the per-parameter autograd and DDP work was ~3.4 ms of a CPU-bound step). Outside, the old layout
is kept: each expert's ``linear_fc{1,2}.weight`` is a view ``weight{1,2}[i]`` (a property, so it
follows ``.to()`` and DDP's buffer moves), `state_dict` / `load_state_dict` use the per-expert names, and
the distributed checkpoint holds the same shards as `SequentialMLP`'s (one factory per stacked
parameter builds them), so checkpoints load across the switch. Tested in `tests/test_stacked_experts.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
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


_STACKED = (("weight1", "linear_fc1"), ("weight2", "linear_fc2"))


class _StackedExpertWeight:
    """Mixin for an expert's linear layer whose ``weight`` is a slice of its layer's stacked Parameter.

    The slice is taken on every read, so it always views the Parameter's current storage (after
    ``.to()``, ``.bfloat16()``, DDP's move into its buffer). The state dict keeps the per-expert name.
    """

    @property
    def weight(self):
        owner, name, i = self.__dict__["_stacked_at"]
        views = owner.__dict__.get("_views")  # one unbind per loop forward: one gradient node, not E
        return views[name][i] if views is not None else owner._parameters[name][i]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        w = self.weight
        destination[prefix + "weight"] = w if keep_vars else w.detach()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        rest = {k: v for k, v in state_dict.items() if k != key}
        if key in state_dict:
            src, dst = state_dict[key], self.weight
            if not isinstance(src, torch.Tensor) or tuple(src.shape) != tuple(dst.shape):
                shape = tuple(src.shape) if isinstance(src, torch.Tensor) else type(src).__name__
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {shape}, the shape in "
                                  f"current model is {tuple(dst.shape)} (moe_stacked_experts holds it stacked)")
            else:
                with torch.no_grad():
                    dst.copy_(src)
        elif strict:
            missing_keys.append(key)
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


@functools.lru_cache(maxsize=None)
def _stacked_class(cls):
    return type(f"StackedExpert{cls.__name__}", (_StackedExpertWeight, cls), {})


def _copy_param_attrs(src: torch.nn.Parameter, dst: torch.nn.Parameter) -> None:
    """The attributes megatron sets on expert weights (TP split, ``allreduce``=False under EP, ...);
    the TP split dim moves by one for the leading expert dim."""
    for k, v in vars(src).items():
        setattr(dst, k, v + 1 if k == "partition_dim" and v >= 0 else v)


def _stacked_factory(param: torch.nn.Parameter, templates: list) -> ShardedTensorFactory:
    """One factory over a stacked Parameter that saves and loads the per-expert shards in `templates`
    (what `SequentialMLP` writes: same keys, offsets, replica ids, SwiGLU split), so checkpoints are
    interchangeable across `moe_stacked_experts`. Its data is the Parameter itself, which is how
    megatron's optimizers find a parameter's checkpoint entry (`get_param_id_to_sharded_param_map`)."""
    base = templates[0].key

    def build(key, t, replica_id, flattened_range):
        out = {}
        n = param[0].numel()
        for i, tpl in enumerate(templates):
            k = key[: len(key) - len(base)] + tpl.key  # keeps e.g. an optimizer-state prefix on the key
            if flattened_range is None:
                piece, rng = t[i], None
            else:  # a flat slice of the whole stacked tensor: the part that falls in expert i
                lo, hi = max(flattened_range.start, i * n), min(flattened_range.stop, (i + 1) * n)
                if lo >= hi:
                    continue
                piece, rng = t[lo - flattened_range.start: hi - flattened_range.start], slice(lo - i * n, hi - i * n)
            if isinstance(tpl, ShardedTensorFactory):
                out[i] = tpl.build_fn(k, piece, replica_id, rng)
            else:
                out[i] = dataclasses.replace(tpl, key=k, data=piece, replica_id=replica_id, flattened_range=rng)
        return out

    def merge(loaded):
        parts = [templates[i].merge_fn(v) if isinstance(templates[i], ShardedTensorFactory) else v
                 for i, v in sorted(loaded.items())]
        return torch.stack(parts) if parts[0].dim() == param.dim() - 1 else torch.cat(parts)

    return ShardedTensorFactory(base, param, build, merge, templates[0].replica_id)


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
        self.stacked = bool(getattr(config, "moe_stacked_experts", False))
        if self.stacked:
            self._stack_parameters()

    def _stack_parameters(self):
        """Move the experts' weights into ``weight1`` / ``weight2`` (module doc)."""
        if self.config.add_bias_linear:
            raise ValueError("moe_stacked_experts does not support expert biases (add_bias_linear=True); "
                             "set moe_stacked_experts=False")
        for name, sub in _STACKED:
            linears = [getattr(e, sub) for e in self.local_experts]
            olds = [lin.weight for lin in linears]
            p = torch.nn.Parameter(torch.stack([w.detach() for w in olds]), requires_grad=olds[0].requires_grad)
            _copy_param_attrs(olds[0], p)
            self.register_parameter(name, p)
            for i, lin in enumerate(linears):
                del lin._parameters["weight"]
                lin.__class__ = _stacked_class(type(lin))
                object.__setattr__(lin, "_stacked_at", (self, name, i))  # not a submodule: no cycle in modules()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Stacked: nothing of its own; each expert's linear saves its view under the per-expert name."""
        if not self.stacked:
            return super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Stacked: per-expert keys fill the views (children); a stacked ``weight1``/``weight2`` entry, as
        `sharded_state_dict`'s factories return it from a distributed checkpoint, is split into them."""
        if self.stacked:
            for name, sub in _STACKED:
                w = state_dict.pop(prefix + name, None)
                if w is not None:
                    if w.shape[0] != self.num_local_experts:
                        error_msgs.append(f"size mismatch for {prefix + name}: {tuple(w.shape)}, the model holds "
                                          f"{self.num_local_experts} local experts")
                        continue
                    for i in range(self.num_local_experts):
                        state_dict[f"{prefix}local_experts.{i}.{sub}.weight"] = w[i]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.stacked:
            own = {prefix + name for name, _ in _STACKED}
            missing_keys[:] = [k for k in missing_keys if k not in own]

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)  # per-expert, views as data
        if self.stacked:
            for name, sub in _STACKED:
                templates = [sd.pop(f"{prefix}local_experts.{i}.{sub}.weight") for i in range(self.num_local_experts)]
                sd[prefix + name] = _stacked_factory(self._parameters[name], templates)
        return sd

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
        version counter, which is part of the key. Stacked (`moe_stacked_experts`): the Parameters.
        """
        if self.stacked:
            return self.weight1, self.weight2
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
            if not self.stacked:
                return super().forward(x, tokens_per_expert, probs)
            if self.config.gradient_accumulation_fusion and torch.is_grad_enabled():
                raise ValueError("moe_stacked_experts: the expert loop cannot fuse gradient accumulation into "
                                 "per-expert views; set gradient_accumulation_fusion=False")
            self._views = {name: self._parameters[name].unbind(0) for name, _ in _STACKED}
            try:  # megatron's loop, each expert on its slices
                return super().forward(x, tokens_per_expert, probs)
            finally:
                self._views = None
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
