"""`generate()` and `stream()`: prompts in, tokens out, for a Qwen3-Next `GPTModel` (any TP size).

Prompts of different lengths come as a left-padded batch with ``attention_mask`` (HF's convention);
the real tokens are packed into one prefill row, so no padding is computed and every sequence gets
exactly the result it would get alone. Decoding then runs one token per sequence per step
(`Decoder.step`), on CUDA as a replayed CUDA graph with no host sync per token; sequences that
reached ``eos_token_id`` keep emitting ``pad_token_id`` (default: the EOS id), and generation ends
when all have, as in HF's ``generate``.

Under tensor parallelism every rank runs this with the same inputs; each holds its heads' states,
the logits are gathered over the group, and sampled tokens are broadcast from TP rank 0.

``speculative_k=k`` decodes greedily with a drafter (``draft``: ``"mtp"``, the checkpoint's MTP block,
or a `speculative.Drafter`) proposing k tokens per verify forward (`inference.speculative`): the same
tokens as plain greedy decoding, in fewer forwards; ``stats`` (a `SpeculativeStats`) receives the counts.
"""

from __future__ import annotations

import warnings
from typing import Iterator, List, Optional

import torch

from .cuda_graph import GraphedStep
from .forward import Batch, forward, rope_table
from .sampling import check_sampling, next_tokens
from .speculative import SpeculativeStats, SpeculativeStream, check_speculative, make_drafter
from .state import InferenceState


def unwrap(model):
    """The Megatron `GPTModel` inside NeMo / Float16Module / DDP wrappers."""
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    return model


def _tp_group(model):
    pgs = getattr(model, "pg_collection", None)
    if pgs is not None and getattr(pgs, "tp", None) is not None:
        return pgs.tp
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


class Decoder:
    """Generation state + the two kinds of forward for one batch: `prefill` once, then `step`s.

    Puts the model in eval mode (dropout off, as generation needs).

    Args:
        cuda_graph: capture the decode step as a CUDA graph (default: on CUDA at TP = EP = 1).
        sync_free: route the decode steps' MoE tokens without host syncs (default: = cuda_graph); the
            eager default is Megatron's dispatcher, the reference.
    """

    def __init__(self, model, batch: int, max_length: int, *, cuda_graph: Optional[bool] = None,
                 sync_free: Optional[bool] = None):
        self.model = model = unwrap(model).eval()
        c = model.config
        if not (model.pre_process and model.post_process):
            raise ValueError("generation needs the whole model in one pipeline stage (pipeline_model_parallel_size=1)")
        if c.sequence_parallel:
            raise ValueError("generation needs sequence_parallel=False (a decode step has one token per sequence)")
        if (c.context_parallel_size or 1) > 1 or c.apply_rope_fusion:
            raise ValueError("generation needs context_parallel_size=1 and apply_rope_fusion=False (per-sequence "
                             "RoPE positions)")
        if max_length > c.max_position_embeddings:
            raise ValueError(f"prompt + new tokens = {max_length} tokens, more than max_position_embeddings="
                             f"{c.max_position_embeddings}: shorten the prompt or max_new_tokens")
        device = next(model.parameters()).device
        self.tp_group = _tp_group(model)
        single = self.tp_group.size() == 1 and (c.expert_model_parallel_size or 1) == 1
        self.cuda_graph = (device.type == "cuda" and single) if cuda_graph is None else cuda_graph
        if self.cuda_graph and device.type != "cuda":
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        self.sync_free = self.cuda_graph if sync_free is None else sync_free
        if self.sync_free and not single:
            raise ValueError("sync_free MoE routing supports TP = EP = 1 only")
        self.state = InferenceState(model, batch, max_length, device)
        self.rope = rope_table(model, max_length)
        self.device, self.batch = device, batch
        self.positions = None  # [1, B]: the cache slot of each sequence's next token
        self._graph = None

    @torch.no_grad()
    def prefill(self, prompts: List[torch.Tensor], return_hidden: bool = False):
        """Run the prompts (1-D id tensors, one per sequence) -> logits ``[B, V]`` of their last tokens
        (and, with ``return_hidden``, the last layer's output ``[T, 1, H]`` at every packed prompt token)."""
        if len(prompts) != self.batch:
            raise ValueError(f"{len(prompts)} prompts for a Decoder of batch {self.batch}")
        lengths = [int(p.numel()) for p in prompts]
        tokens = torch.cat(list(prompts)).to(self.device)
        cu = torch.tensor([0] + lengths, device=self.device).cumsum(0).to(torch.int32)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
        # Megatron's dispatcher here in every mode: a prefill is not captured, so it may sync with the host.
        out = forward(self.model, self.state, tokens[:, None], Batch(positions[:, None], cu, max(lengths)),
                      self.rope, return_hidden=return_hidden)
        self.positions = torch.tensor(lengths, device=self.device)[None]
        return out

    def _eager(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return forward(self.model, self.state, tokens, Batch(positions), self.rope, self.sync_free)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence (``[B]``) -> next logits ``[B, V]`` (on CUDA graphs: a buffer that
        the next step overwrites)."""
        tokens = tokens.view(1, -1)
        if self.cuda_graph and self._graph is None:
            try:
                self._graph = GraphedStep(self._eager, (tokens, self.positions), self.state.tensors())
            except Exception as e:  # e.g. an op that syncs with the host; the eager step is the same math
                warnings.warn(f"decode step not captured as a CUDA graph ({type(e).__name__}: {e}); running eager")
                torch.cuda.synchronize()
                self.cuda_graph = False
        logits = self._graph(tokens, self.positions) if self._graph is not None else self._eager(tokens, self.positions)
        self.positions += 1
        return logits


def _prompts(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> List[torch.Tensor]:
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
        attention_mask = None if attention_mask is None else attention_mask.view(1, -1)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [B, T] with T >= 1 (got shape {tuple(input_ids.shape)}): empty prompt")
    if attention_mask is None:
        return list(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have input_ids' shape {tuple(input_ids.shape)}")
    prompts = [ids[m.bool()] for ids, m in zip(input_ids, attention_mask)]
    for b, p in enumerate(prompts):
        if p.numel() == 0:
            raise ValueError(f"prompt {b} is empty (its attention_mask row is all zeros)")
    return prompts


def stream(model, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
           top_k: Optional[int] = None, top_p: Optional[float] = None, eos_token_id: Optional[int] = None,
           pad_token_id: Optional[int] = None, attention_mask: Optional[torch.Tensor] = None,
           seed: Optional[int] = None, cuda_graph: Optional[bool] = None, speculative_k: Optional[int] = None,
           draft="mtp", stats: Optional[SpeculativeStats] = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence (``[B]``, on the model's device) step by step.

    Arguments as `generate`; they are checked here, before the first token is asked for. Stops after
    ``max_new_tokens`` or once every sequence has emitted EOS (checked every step on CPU, every 8 steps
    on CUDA, so that the loop does not wait for the GPU). With ``speculative_k`` the iterator is a
    `SpeculativeStream` (its ``stats`` fill as it goes).
    """
    check_sampling(temperature, top_k, top_p)
    model = unwrap(model)
    limit = model.config.max_position_embeddings
    prompts = _prompts(input_ids, attention_mask)
    longest = max(p.numel() for p in prompts)
    if longest > limit:
        raise ValueError(f"prompt has {longest} tokens, more than max_position_embeddings={limit}")
    if speculative_k is not None:
        check_speculative(speculative_k, temperature, len(prompts))
        drafter = make_drafter(model, draft)
    if max_new_tokens < 1:
        return iter(())
    if speculative_k is not None:
        device = next(model.parameters()).device
        single = _tp_group(model).size() == 1 and (model.config.expert_model_parallel_size or 1) == 1
        graphs = (device.type == "cuda" and single) if cuda_graph is None else cuda_graph
        if graphs and device.type != "cuda":
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        dec = Decoder(model, 1, longest + max_new_tokens, cuda_graph=False, sync_free=graphs)
        return SpeculativeStream(dec, prompts[0], max_new_tokens, speculative_k, drafter, eos_token_id, stats,
                                 cuda_graph=graphs)
    dec = Decoder(model, len(prompts), longest + max_new_tokens, cuda_graph=cuda_graph)
    generator = None if seed is None else torch.Generator(dec.device).manual_seed(seed)
    pad = eos_token_id if pad_token_id is None else pad_token_id
    return _steps(dec, prompts, max_new_tokens, temperature, top_k, top_p, eos_token_id, pad, generator)


def _steps(dec: Decoder, prompts, max_new_tokens, temperature, top_k, top_p, eos_token_id, pad, generator):
    broadcast = temperature > 0 and dec.tp_group.size() > 1
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=dec.device)
    check_every = 8 if dec.device.type == "cuda" else 1
    logits = dec.prefill(prompts)
    for i in range(max_new_tokens):
        tok = next_tokens(logits, temperature, top_k, top_p, generator)
        if broadcast:  # one draw for the whole TP group
            torch.distributed.broadcast(tok, torch.distributed.get_global_rank(dec.tp_group, 0), group=dec.tp_group)
        if eos_token_id is not None:
            tok = torch.where(finished, torch.full_like(tok, pad), tok)
            finished |= tok == eos_token_id
        yield tok
        if i + 1 == max_new_tokens or (eos_token_id is not None and (i + 1) % check_every == 0 and bool(finished.all())):
            return
        logits = dec.step(tok)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, eos_token_id: Optional[int] = None,
             attention_mask: Optional[torch.Tensor] = None, seed: Optional[int] = None,
             pad_token_id: Optional[int] = None, cuda_graph: Optional[bool] = None,
             speculative_k: Optional[int] = None, draft="mtp",
             stats: Optional[SpeculativeStats] = None) -> torch.LongTensor:
    """Prompts ``input_ids [B, T]`` (left-padded, with ``attention_mask``, when lengths differ) ->
    ``[B, T + n]``: the input followed by ``n <= max_new_tokens`` new tokens.

    ``temperature=0`` is greedy; otherwise temperature, then ``top_k``, then ``top_p`` (in (0, 1]).
    ``seed`` makes sampling reproducible. With ``eos_token_id`` a sequence stops at its EOS (then
    ``pad_token_id``, default EOS), and ``n`` ends where the last sequence stopped (HF's lengths).
    ``speculative_k``, ``draft``, ``stats``: speculative greedy decoding (module docstring).
    """
    steps = list(stream(model, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        eos_token_id=eos_token_id, pad_token_id=pad_token_id, attention_mask=attention_mask,
                        seed=seed, cuda_graph=cuda_graph, speculative_k=speculative_k, draft=draft, stats=stats))
    input_ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    if not steps:
        return input_ids
    new = torch.stack(steps, dim=1).to(input_ids.device)  # [B, n]
    if eos_token_id is not None:  # HF ends at the step where the last sequence emitted its EOS
        hit = new == eos_token_id
        done = hit.any(1)
        if bool(done.all()):
            new = new[:, : int(hit.float().argmax(1).max()) + 1]
    return torch.cat([input_ids, new.to(input_ids.dtype)], dim=1)
