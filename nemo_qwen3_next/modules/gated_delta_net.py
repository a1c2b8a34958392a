"""Gated DeltaNet: Qwen3-Next's linear-attention token mixer, tensor- and sequence-parallel.

Shapes (Hk key heads, Hv = r·Hk value heads, dims Dk, Dv, conv width W, TP size t)::

    in_proj   [H] -> per key head [q Dk | k Dk | v r·Dv | z r·Dv | b r | a r]     column-parallel
    conv1d    depthwise, causal, W taps, over per-key-head [q | k | v] channels   split like in_proj
    A_log, dt_bias  [Hv]                                                          split by head
    out_norm  RMSNorm over Dv gated by silu(z), one gain shared by all heads      replicated
    out_proj  [Hv·Dv] -> [H]                                                      row-parallel

Parameters per layer: H·Hk·(2Dk + 2r·Dv + 2r) + (2Hk·Dk + Hv·Dv)·W + 2Hv + Dv + Hv·Dv·H.

Every TP-split tensor is laid out *per key head*, so a contiguous split along dim 0 hands each
rank whole key heads with their value heads: no custom sharding code, and Megatron's default
distributed-checkpoint sharding is right. (HF stores conv channels as [q_all | k_all | v_all]
and in_proj as two matrices; `hf_mapping` permutes.)

Math per token t and value head j (key head j // r), all gates in fp32::

    q, k = l2norm(silu(conv(q))), l2norm(silu(conv(k)));  v = silu(conv(v))
    g = -exp(A_log) · softplus(a + dt_bias);  beta = sigmoid(b)
    S_t = S_{t-1}·exp(g_t) + k_t ⊗ beta_t·(v_t - S_{t-1}ᵀ k_t·exp(g_t));   o_t = S_tᵀ q_t / sqrt(Dk)
    y = out_proj(RMSNorm(o) · w · silu(z))

Packed sequences (`packed_seq_params.cu_seqlens_q`) restart both the conv history and the
recurrent state at every document boundary.

Context parallelism (a CP group of size > 1): the reference path runs the same conv and rule on
this rank's two sequence chunks through `parallel.context` (conv left context and chunk states
exchanged, exact); the fused path is not used under CP yet.

Two forward paths, one set of parameters:

* `_forward_reference` (CPU, or `linear_attention_backend="torch"`): the math above step by step in
  plain torch; the CPU parity tests against HF run this path.
* `_forward_fused` (CUDA): works in the layouts the kernels want. The projections run batch-first
  (transposing the narrow `[s, b, H]` activations, not the 6x wider projection; kept sequence-first
  under sequence parallelism, whose gather/scatter is along dim 0). Where in_proj is a bare GEMM
  (TP=1, no SP/FP8/fused grad accumulation) it runs *planar* on a weight copied out of the
  per-key-head layout into ``[q_all | k_all | v_all | z_all | b_all | a_all]`` (`_PlanarPieces`):
  with our kernels one GEMM whose output q, k, v, z, b, a are column views, our convs and norm
  writing their input gradients into one buffer (`ops.grad_sink`), so the input and weight gradients
  are one GEMM each; otherwise five GEMMs on the weight's pieces. Three causal convs (one per q/k/v,
  on their conv-weight pieces) give the chunk kernel contiguous q, k, v, so its input guard copies
  nothing and no gradient cat feeds the conv backward. Otherwise
  one strided `cat` of `[q k v]` feeds one conv. The conv is fla's Triton causal conv (or Dao's
  `causal-conv1d`). The chunked rule is FlashQLA when
  installed (see `ops.gated_delta_rule`), else fla's kernel with q/k at `Hk` heads (grouped value
  heads, no `repeat_interleave`), L2-norm, decay from `A_log`/`dt_bias` and `sigmoid(b)` in-kernel;
  fla's fused gated RMSNorm reads z in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional, Union

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.utils import divide

from ..ops import causal_conv1d, gated_delta_rule, own_kernels
from ..ops.gated_delta_rule import gdn_gate
from ..ops.grad_sink import column_views
from ..parallel.context import causal_conv1d_cp, cp_group_or_none, gated_delta_rule_cp
from .cuda_graphs import graphed_or_none
from .norms import GatedRMSNorm


class _PlanarPieces(torch.autograd.Function):
    """Per-key-head ``w [Hk, G, *]`` -> contiguous planar pieces: each piece is some column ranges of
    dim 1 over all key heads, range after range (``cat(w[:, o:o + n].reshape(Hk * n, *) for o, n)``).

    The same values as ``w.view(Hk * G, *).index_select(0, rows)``, by strided copies. The backward
    writes each piece's gradient into one ``torch.empty`` by slice assignment, because the ranges cover
    every column once. ``index_select``'s backward would zero-fill and then ``index_add`` with atomics.
    ``layout`` is a tuple of pieces, and each piece is a tuple of ``(offset, size)`` ranges of dim 1.
    """

    @staticmethod
    def forward(ctx, w, layout):
        ctx.layout, ctx.shape = layout, w.shape
        ctx.set_materialize_grads(False)
        Hk, rest = w.shape[0], w.shape[2:]
        outs = []
        for piece in layout:
            out = w.new_empty(Hk * sum(n for _, n in piece), *rest)
            row = 0
            for o, n in piece:
                out[row:row + Hk * n].view(Hk, n, *rest).copy_(w[:, o:o + n])
                row += Hk * n
            outs.append(out)
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        Hk, rest = ctx.shape[0], ctx.shape[2:]
        ref = next((g for g in grads if g is not None), None)
        if ref is None:
            return None, None
        gw = ref.new_empty(ctx.shape)
        for piece, g in zip(ctx.layout, grads):
            row = 0
            for o, n in piece:
                if g is None:
                    gw[:, o:o + n].zero_()
                else:
                    gw[:, o:o + n].copy_(g[row:row + Hk * n].view(Hk, n, *rest))
                row += Hk * n
        return gw, None


def _planar_layout(sizes, pieces):
    """``_PlanarPieces`` layout: ``sizes`` are the per-key-head column groups (in order), ``pieces`` the
    group indices each piece takes; every group must be taken once (the backward leaves none unwritten)."""
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    taken = sorted(i for piece in pieces for i in piece)
    if taken != list(range(len(sizes))):
        raise ValueError(f"planar pieces {pieces} must take each of the {len(sizes)} column groups once")
    return tuple(tuple((offsets[i], sizes[i]) for i in piece) for piece in pieces)


class _SharedInputLinears(torch.autograd.Function):
    """``x [N, H]`` times several weights ``[rows_i, H]`` -> every ``x @ w_i.T``.

    One ``F.linear`` per weight would leave autograd to sum the input gradients, with one
    activation-sized elementwise add per extra weight. Here they accumulate inside the GEMMs
    (``addmm_``).
    """

    @staticmethod
    def forward(ctx, x, *weights):
        ctx.save_for_backward(x, *weights)
        ctx.set_materialize_grads(False)
        return tuple(x @ w.t() for w in weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        gx, gws = None, []
        for i, (w, g) in enumerate(zip(weights, grads)):
            if g is not None and ctx.needs_input_grad[0]:
                gx = g @ w if gx is None else gx.addmm_(g, w)
            gws.append(g.t() @ x if g is not None and ctx.needs_input_grad[1 + i] else None)
        return (gx, *gws)


@dataclass
class GatedDeltaNetSubmodules:
    """Swappable pieces: the two linears (local or TransformerEngine) and the output norm."""

    in_proj: Union[ModuleSpec, type] = None
    out_proj: Union[ModuleSpec, type] = None


class GatedDeltaNet(MegatronModule):
    """Qwen3-Next Gated DeltaNet layer; input and output `[s, b, H]` (sequence-first, Megatron)."""

    def __init__(
        self,
        config,
        submodules: GatedDeltaNetSubmodules,
        layer_number: int,
        pg_collection: Optional[ProcessGroupCollection] = None,
        **_unused,
    ):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.cp_group = cp_group_or_none(pg_collection)  # None: no context parallelism
        self.layer_number = layer_number
        tp = pg_collection.tp.size()

        c = config
        self.key_head_dim = c.linear_key_head_dim
        self.value_head_dim = c.linear_value_head_dim
        self.heads_per_key = divide(c.linear_num_value_heads, c.linear_num_key_heads)  # r
        self.num_key_heads = divide(c.linear_num_key_heads, tp)  # per partition
        self.num_value_heads = self.num_key_heads * self.heads_per_key
        r, dk, dv = self.heads_per_key, self.key_head_dim, self.value_head_dim
        self.group_split = [dk, dk, r * dv, r * dv, r, r]  # q k v z b a, per key head
        self.conv_group = 2 * dk + r * dv  # q k v channels per key head
        # planar fused path: in_proj weight pieces q, k, v, [z_all | b_all | a_all]; conv weight q, k, v
        # q, k, v, z, [b | a]: z a piece of its own, so the gated norm reads it contiguous (a strided z costs
        # the norm a 4096-wide copy per token each way) and no gradient cat joins z with b, a
        self._proj_layout = _planar_layout(self.group_split, ((0,), (1,), (2,), (3,), (4, 5)))
        self._conv_layout = _planar_layout(self.group_split[:3], ((0,), (1,), (2,)))
        # one-GEMM planar in_proj (`own_kernels.one_in_proj_gemm`): the whole weight as one planar piece
        # [q_all | k_all | v_all | z_all | b_all | a_all], its output split into column views of these sizes
        self._proj_layout_one = _planar_layout(self.group_split, (tuple(range(len(self.group_split))),))
        self._proj_sizes = tuple(self.num_key_heads * n for n in self.group_split)
        self.chunk_size = c.linear_attention_chunk_size
        self.use_recurrent = c.linear_attention_use_recurrent
        self.backend = c.linear_attention_backend
        self.split_in_proj = True  # fused path: in_proj as two GEMMs where safe (see _direct_in_proj_ok)

        proj_size = c.linear_num_key_heads * sum(self.group_split)
        self.in_proj = build_module(
            submodules.in_proj,
            c.hidden_size,
            proj_size,
            config=c,
            init_method=c.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="fc1",
            tp_group=pg_collection.tp,
        )

        conv_channels = self.num_key_heads * self.conv_group
        dtype = c.params_dtype
        self.conv1d = nn.Conv1d(
            conv_channels, conv_channels, c.linear_conv_kernel_dim, groups=conv_channels, bias=False, dtype=dtype
        )
        self.A_log = nn.Parameter(torch.empty(self.num_value_heads, dtype=dtype))
        self.dt_bias = nn.Parameter(torch.ones(self.num_value_heads, dtype=dtype))
        for p in (self.conv1d.weight, self.A_log, self.dt_bias):
            set_tensor_model_parallel_attributes(p, True, 0, 1)
        self.out_norm = GatedRMSNorm(
            dv, eps=c.layernorm_epsilon, params_dtype=dtype, tp_group=pg_collection.tp, backend=self.backend
        )

        self.out_proj = build_module(
            submodules.out_proj,
            c.linear_num_value_heads * dv,
            c.hidden_size,
            config=c,
            init_method=c.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="fc2",
            tp_group=pg_collection.tp,
        )
        self.reset_parameters()

    def reset_parameters(self):
        """HF initialisation: A ~ U(0, 16) as log, dt_bias = 1, conv default (kaiming)."""
        if self.config.perform_initialization:
            with torch.no_grad():
                self.A_log.copy_(torch.empty_like(self.A_log, dtype=torch.float32).uniform_(0, 16).log_())
                self.dt_bias.fill_(1.0)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, packed_seq_params=None, **kwargs):
        """`[s, b, H]` -> (`[s, b, H]`, bias or None). `attention_mask` is unused (causal by design)."""
        if kwargs.get("inference_context") is not None:
            raise NotImplementedError(
                "GatedDeltaNet does not support Megatron inference contexts yet (generation with GDN "
                "recurrent state is planned); run the model without inference_context."
            )
        cu_seqlens = None
        if packed_seq_params is not None:
            cu_seqlens = packed_seq_params.cu_seqlens_q_padded
            if cu_seqlens is None:
                cu_seqlens = packed_seq_params.cu_seqlens_q

        if getattr(self.config, "mixer_cuda_graphs", False) and self.backend != "torch":
            out = graphed_or_none(self, self._fused_output, hidden_states, packed_seq_params=packed_seq_params,
                                  recompute=bool(getattr(self.config, "linear_attention_recompute", False)))
            if out is not None:
                return out, None
        if hidden_states.is_cuda and self.backend != "torch" and self.cp_group is None:
            return self._forward_fused(hidden_states, cu_seqlens)
        return self._forward_reference(hidden_states, cu_seqlens)

    def _fused_output(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The fused path's output alone, as `config.mixer_cuda_graphs` captures it (no packing)."""
        out, bias = self._forward_fused(hidden_states, None)
        if bias is not None:
            raise RuntimeError("out_proj returns a separate bias; CUDA-graph replay supports none")
        return out

    def _forward_reference(self, hidden_states: torch.Tensor, cu_seqlens: Optional[torch.Tensor]):
        """Plain-torch path (CPU): every step spelled out, the ground truth for the fused path."""
        proj, _ = self.in_proj(hidden_states)  # [s, b, Hk_l * group]
        s, b = proj.shape[:2]
        proj = proj.transpose(0, 1).reshape(b, s, self.num_key_heads, -1)  # work batch-first
        q, k, v, z, beta, a = torch.split(proj, self.group_split, dim=-1)

        qkv = torch.cat([q, k, v], dim=-1).reshape(b, s, -1)
        o = self._recompute_or_run(self._mix_reference, qkv, z, beta, a, cu_seqlens)  # [b, s, Hv_l, Dv]
        o = o.reshape(b, s, -1).transpose(0, 1).contiguous()
        return self.out_proj(o)

    def _mix_reference(self, qkv, z, beta, a, cu_seqlens):
        """conv -> gated delta rule -> gated norm on the reference path (z, beta, a: per key head)."""
        b, s = qkv.shape[:2]
        conv, rule = causal_conv1d, gated_delta_rule
        if self.cp_group is not None:  # the same math over this rank's two chunks of the sequence
            conv, rule = (partial(f, group=self.cp_group) for f in (causal_conv1d_cp, gated_delta_rule_cp))
        qkv, _ = conv(
            qkv, self.conv1d.weight.squeeze(1), activation="silu", cu_seqlens=cu_seqlens, backend=self.backend
        )
        qkv = qkv.view(b, s, self.num_key_heads, self.conv_group)
        dk = self.key_head_dim
        q, k, v = torch.split(qkv, [dk, dk, self.heads_per_key * self.value_head_dim], dim=-1)
        v = v.reshape(b, s, self.num_value_heads, self.value_head_dim)
        z = z.reshape(b, s, self.num_value_heads, self.value_head_dim)

        beta = beta.reshape(b, s, self.num_value_heads).sigmoid()
        a = a.reshape(b, s, self.num_value_heads)
        g = gdn_gate(a, self.A_log, self.dt_bias)

        o, _ = rule(
            q,
            k,
            v,
            g,
            beta,
            use_qk_l2norm=True,
            cu_seqlens=cu_seqlens,
            use_recurrent=self.use_recurrent,
            chunk_size=self.chunk_size,
            backend=self.backend,
        )
        return self.out_norm(o, z)  # [b, s, Hv_l, Dv]

    def _direct_in_proj_ok(self) -> bool:
        """Whether the fused path may run in_proj as plain GEMMs on planar weight pieces.

        Only where in_proj's own forward would be a bare ``x @ W.T``: one TP rank, no sequence
        parallelism, no fused weight-gradient accumulation, no FP8, no bias.
        """
        c, lin = self.config, self.in_proj
        w = getattr(lin, "weight", None)
        return (
            self.split_in_proj
            and isinstance(w, torch.Tensor)
            and w.dim() == 2
            and self.pg_collection.tp.size() == 1
            and not c.sequence_parallel
            and not getattr(c, "gradient_accumulation_fusion", False)
            and not getattr(c, "fp8", None)
            and getattr(lin, "bias", None) is None
        )

    def _in_proj_rows(self, device) -> tuple:
        """Row indices of in_proj's weight: per-key-head ``[q k v]`` (the conv's channel order), then
        ``[z_all | b_all | a_all]`` in value-head order (so z reshapes to ``[.., Hv, Dv]`` as a view).
        Generation (`inference.forward.gdn_forward`) gathers in_proj's output columns with these."""
        key = (device, self.num_key_heads)
        cached = getattr(self, "_rows_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        Hk, G, r, dk, dv = self.num_key_heads, sum(self.group_split), self.heads_per_key, self.key_head_dim, self.value_head_dim
        base = torch.arange(Hk, device=device).unsqueeze(1) * G  # [Hk, 1]
        qkv = (base + torch.arange(self.conv_group, device=device)).reshape(-1)
        off = self.conv_group
        z = (base + off + torch.arange(r * dv, device=device)).reshape(-1)
        b = (base + off + r * dv + torch.arange(r, device=device)).reshape(-1)
        a = (base + off + r * dv + r + torch.arange(r, device=device)).reshape(-1)
        rows = (qkv, torch.cat([z, b, a]))
        self._rows_cache = (key, rows)
        return rows

    def _forward_fused(self, hidden_states: torch.Tensor, cu_seqlens: Optional[torch.Tensor]):
        """CUDA path: fla kernels in their layouts, fewest copies (see the module docstring)."""
        s, b = hidden_states.shape[:2]
        # Sequence parallelism gathers/scatters along dim 0 inside the linears: stay [s, b, *] there.
        batch_first = b > 1 and not self.config.sequence_parallel
        planar = self._direct_in_proj_ok()
        # Our conv reads strided rows and our gated norm writes its output in z's layout, so with them the
        # planar path stays sequence-first at b > 1: no transpose of the input or the output (own_kernels).
        seq_first = planar and batch_first and own_kernels.enabled()
        if seq_first:
            batch_first = False
        # our conv and norm take the gradient sink; packed input goes to fla's conv (which would not)
        one_gemm = planar and cu_seqlens is None and own_kernels.one_in_proj_gemm()
        x = hidden_states.transpose(0, 1).contiguous() if batch_first else hidden_states
        Hk, G, r = self.num_key_heads, sum(self.group_split), self.heads_per_key
        dk, dv, Hv = self.key_head_dim, self.value_head_dim, self.num_value_heads

        if planar:
            # Planar: q, k, v, z and the gates contiguous or strided rows (never a per-key-head interleave), so
            # the three convs and the chunk kernel copy nothing and nothing is concatenated (forward or backward).
            # Here x is batch-first or b == 1, so its rows are (b, s)-ordered, or (seq_first) (s, b)-ordered and
            # the pieces are [b, s, *] views of [s, b, *] memory.
            w = self.in_proj.weight
            rows = (lambda t: t.view(s, b, -1).transpose(0, 1)) if seq_first else (lambda t: t.view(b, s, -1))
            if one_gemm:
                # One GEMM on the whole planar weight; q, k, v, z, b, a are column views of its output. Our convs
                # and norm write their input gradients into their places in one buffer (`grad_sink`), which is
                # the GEMM's output gradient: one GEMM each for the input and the weight gradient, no cat.
                (wp,) = _PlanarPieces.apply(w.view(Hk, G, w.shape[-1]), self._proj_layout_one)
                sink, outs = column_views(torch.matmul(x.reshape(b * s, -1), wp.t()), self._proj_sizes)
                q, k, v, z, beta, a = (rows(t) for t in outs)
                beta, a = beta.contiguous(), a.contiguous()  # 2 x [b, s, Hv]: small, for the gate kernels
            else:
                # five GEMMs on weight pieces q, k, v, z, [b | a]; the input gradient accumulates in them (addmm_)
                sink = None
                pieces = _PlanarPieces.apply(w.view(Hk, G, w.shape[-1]), self._proj_layout)
                q, k, v, z, ba = (rows(t) for t in _SharedInputLinears.apply(x.reshape(b * s, -1), *pieces))
                beta, a = torch.split(ba, [Hv, Hv], dim=-1)
                if seq_first:  # the gates: small, copied batch-first for the chunk kernels
                    beta, a = beta.contiguous(), a.contiguous()
            z = z.view(b, s, Hv, dv)  # contiguous (seq_first: a [b, s] view of [s, b] memory; one_gemm: strided rows)
            conv_in = (q, k, v)
        else:
            proj, _ = self.in_proj(x)
            if not batch_first:
                proj = proj.transpose(0, 1)  # a view; free when b == 1
            proj = proj.view(b, -1, Hk, G)
            s = proj.shape[1]
            # One split node each (its backward is one cat), never several slices of one tensor: a
            # slice's backward materialises a zero tensor of the full input size per slice.
            q, k, v, z, beta, a = torch.split(proj, self.group_split, dim=-1)
            qkv = torch.cat([q, k, v], dim=-1).view(b, s, Hk * self.conv_group)  # the one copy before the conv
            z = z.reshape(b, s, Hv, dv)  # a strided view, read in place by the fused norm
            beta = beta.reshape(b, s, Hv)  # logits
            a = a.reshape(b, s, Hv)  # raw gate input
            conv_in = (qkv,)
            sink = None
        o = self._recompute_or_run(self._mix_fused, z, beta, a, cu_seqlens, sink, *conv_in).view(b, s, Hv * dv)
        if batch_first:
            out, bias = self.out_proj(o)
            return out.transpose(0, 1).contiguous(), bias
        return self.out_proj(o.transpose(0, 1).contiguous())  # free when b == 1 or seq_first (already [s, b])

    def _mix_fused(self, z, beta, a, cu_seqlens, sink, *conv_in):
        """conv -> gated delta rule -> gated norm on the fused path: what `linear_attention_recompute` recomputes.

        ``conv_in`` is one per-key-head ``[q k v]`` tensor (one conv), or planar q, k, v (three convs on
        their conv-weight pieces, whose outputs are the chunk kernel's contiguous inputs). ``sink``: the
        `grad_sink.GradSink` of in_proj's output where q, k, v and z are its column views (one-GEMM path)."""
        b, s = z.shape[:2]
        Hk, r, dk, dv, Hv = self.num_key_heads, self.heads_per_key, self.key_head_dim, self.value_head_dim, self.num_value_heads
        w = self.conv1d.weight.squeeze(1)  # [Hk * conv_group, W]
        if cu_seqlens is not None:  # one int64 tensor for every kernel: fla caches its chunk indices by tensor identity
            cu_seqlens = cu_seqlens.to(device=z.device, dtype=torch.long)
        conv = partial(causal_conv1d, activation="silu", cu_seqlens=cu_seqlens, backend=self.backend)
        # Planar q and k with our conv (`own_kernels.fused_qk_norm`, the default): their L2-norm runs in the conv
        # kernel (written once; the backward reuses the forward's rstd), not as separate passes around the chunk
        # kernel (FlashQLA's norm reads and writes q and k each way and casts fp32 gradients: ~0.4 ms of kernels
        # at B=4 T=4096 on H100, Dec 06 profiles).
        qk_norm_in_conv = len(conv_in) == 3 and cu_seqlens is None and own_kernels.fused_qk_norm()
        if len(conv_in) == 1:
            qkv, _ = conv(conv_in[0], w)
            q, k, v = torch.split(qkv.view(b, s, Hk, self.conv_group), [dk, dk, r * dv], dim=-1)
        else:
            ws = _PlanarPieces.apply(w.view(Hk, self.conv_group, w.shape[-1]), self._conv_layout)
            norm = dk if qk_norm_in_conv else None
            q, k, v = (conv(t, wt, l2norm_head_dim=hd, grad_sink=sink)[0]
                       for t, wt, hd in zip(conv_in, ws, (norm, norm, None)))
            q, k = q.view(b, s, Hk, dk), k.view(b, s, Hk, dk)
        v = v.reshape(b, s, Hv, dv)  # a view
        o, _ = gated_delta_rule(
            q,
            k,
            v,
            a,
            beta,
            use_qk_l2norm=not qk_norm_in_conv,
            A_log=self.A_log,
            dt_bias=self.dt_bias,
            beta_is_logits=True,
            cu_seqlens=cu_seqlens,
            use_recurrent=self.use_recurrent,
            chunk_size=self.chunk_size,
            backend=self.backend,
        )
        return self.out_norm(o, z, gate_grad_sink=sink)

    def _recompute_or_run(self, fn, *args):
        """``fn(*args)``, or under ``config.linear_attention_recompute`` (training) checkpointed: only its
        inputs are kept (the conv input, z, b, a) and the conv, delta rule and norm run again in backward.
        torch's non-reentrant checkpoint: no randomness here, and it runs on CPU as on GPU."""
        if self.training and getattr(self.config, "linear_attention_recompute", False) and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Distributed-checkpoint view: per-head tensors split on dim 0 across TP, the norm gain replicated.

        Because every split tensor is laid out per key head, the global tensor is the plain
        concatenation of the ranks' shards, so a checkpoint loads at any TP size.
        """
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        sd = {}
        for name in ("in_proj", "out_proj"):
            sd.update(getattr(self, name).sharded_state_dict(f"{prefix}{name}.", sharded_offsets, metadata))
        local = {
            "conv1d.weight": self.conv1d.weight,
            "A_log": self.A_log,
            "dt_bias": self.dt_bias,
            "out_norm.weight": self.out_norm.weight,
        }
        axis = {"conv1d.weight": 0, "A_log": 0, "dt_bias": 0}
        sd.update(make_sharded_tensors_for_checkpoint(local, prefix, axis, sharded_offsets))
        return sd
