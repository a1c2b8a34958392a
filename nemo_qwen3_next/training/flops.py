"""Model FLOPs of Qwen3-Next: what tokens/s turns into TFLOP/s.

Counts multiply-adds as 2 FLOPs, forward only, per token, for a sequence of length `seq_length`;
training = 3 x forward (backward = 2 x forward; activation recompute is not counted, as in MFU).

Per layer (h hidden, s sequence, C GDN chunk):

* gated attention: q|gate, k, v projections ``2h(2·n·d + 2·g·d)``, output ``2·n·d·h``, and causal
  scores + weighted values ``2·2·n·d·(s+1)/2`` (each token sees (s+1)/2 keys on average).
* Gated DeltaNet (Hk key heads, Hv value heads, dims Dk, Dv, conv width W):
  in_proj ``2h(2·Hk·Dk + 2·Hv·Dv + 2·Hv)``, depthwise conv ``2W(2·Hk·Dk + Hv·Dv)``,
  out_proj ``2·Hv·Dv·h``, and the chunked delta rule per value head as the chunk kernel computes
  it: across chunks ``6·Dk·Dv`` (read the state with q and with the WY keys w, write it with
  kᵀ·v_new), within a chunk ``2·C·(3·Dk + 2·Dv)`` (k·kᵀ, w = A·k, u = A·v, q·kᵀ, attn·v_new; full
  C x C products, as the kernel does them; the small triangular solve is not counted).
  Unlike attention this does not grow with s: that is the point of the layer.
* MoE: router ``2hE``, top-k routed experts ``k·6·h·f`` (gated: fc1 h→2f, fc2 f→h), shared
  expert ``6·h·f_s`` plus its gate ``2h``; dense MLP ``6·h·F``.
* LM head ``2·h·V``. Embedding lookups and norms are not counted.
* MTP (``mtp_num_layers`` = D, `modules/mtp.py`), per depth: ``fc`` 2H→H ``2·2h·h``, one gated
  full-attention layer with MoE (dense MLP without experts), and the shared LM head again, under ``mtp``.
"""

from __future__ import annotations

from typing import Dict

from ..config import FULL, LINEAR


def forward_flops_per_token(config, seq_length: int) -> Dict[str, float]:
    """Forward FLOPs per token by component (keys: attention, gdn, moe, mlp, lm_head, [mtp,] total)."""
    c = config
    h = c.hidden_size
    out = {"attention": 0.0, "gdn": 0.0, "moe": 0.0, "mlp": 0.0, "lm_head": 0.0}
    n, g = c.num_attention_heads, (c.num_query_groups or c.num_attention_heads)
    d = c.kv_channels or h // n
    gate = 2 if getattr(c, "attention_output_gate", True) else 1
    hk, hv = c.linear_num_key_heads, c.linear_num_value_heads
    dk, dv, w, chunk = c.linear_key_head_dim, c.linear_value_head_dim, c.linear_conv_kernel_dim, c.linear_attention_chunk_size
    chunk = min(chunk, seq_length)

    def attention():
        return 2 * h * (gate * n * d + 2 * g * d) + 2 * n * d * h + 2 * 2 * n * d * (seq_length + 1) / 2

    def moe():
        e, k, f = c.num_moe_experts, c.moe_router_topk, c.moe_ffn_hidden_size
        flops = 2 * h * e + k * 6 * h * f
        if c.moe_shared_expert_intermediate_size:
            flops += 6 * h * c.moe_shared_expert_intermediate_size
            if getattr(c, "moe_shared_expert_gate", False):
                flops += 2 * h
        return flops

    for i in range(c.num_layers):
        kind = c.layer_types[i]
        if kind == FULL:
            out["attention"] += attention()
        elif kind == LINEAR:
            proj = 2 * h * (2 * hk * dk + 2 * hv * dv + 2 * hv) + 2 * hv * dv * h
            conv = 2 * w * (2 * hk * dk + hv * dv)
            rule = hv * (6 * dk * dv + 2 * chunk * (3 * dk + 2 * dv))
            out["gdn"] += proj + conv + rule
        if c.is_moe_layer(i):
            out["moe"] += moe()
        else:
            out["mlp"] += 6 * h * c.ffn_hidden_size
    depth = getattr(c, "mtp_num_layers", None) or 0
    if depth:
        mlp = moe() if c.num_moe_experts else 6 * h * c.ffn_hidden_size
        out["mtp"] = depth * (2 * 2 * h * h + attention() + mlp + 2.0 * h * c.vocab_size)
    out["lm_head"] = 2.0 * h * c.vocab_size
    out["total"] = sum(out.values())
    return out


def train_flops_per_step(config, seq_length: int, global_batch_size: int) -> float:
    """FLOPs of one optimizer step (forward + backward) over the global batch."""
    return 3.0 * forward_flops_per_token(config, seq_length)["total"] * seq_length * global_batch_size
