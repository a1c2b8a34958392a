"""Speculative decoding: a drafter proposes k tokens, the model verifies them in one forward.

One round, for a sequence whose last emitted token ``x`` is not yet in the state (at position P):

1. the drafter proposes ``d_1..d_k`` (`Drafter.propose`);
2. the model runs ``[x, d_1, .., d_k]`` at positions ``P..P+k`` in one forward from the cached state
   (`inference.forward` with ``s = k + 1`` tokens) -> its greedy choices ``g_0..g_k``;
3. the longest prefix with ``d_i == g_{i-1}`` is accepted (``a`` tokens), then the model's own ``g_a``
   is appended: ``a + 1`` new tokens, exactly those that plain greedy decoding would have produced;
4. the state rolls back to the last accepted token (position ``P + a``):

   * KV cache: nothing to undo. Token ``p`` lives at cache slot ``p`` and a query at ``p`` sees slots
     ``<= p``, so moving the position pointer to ``P + a + 1`` hides the rejected entries; the next
     round overwrites them.
   * GDN conv and recurrent states: the verify forward runs the GDN layers' single-token updates (the
     conv shift and the recurrent rule, fla's fused recurrent kernel on CUDA) token by token and keeps the
     state after each of the ``k + 1`` tokens (``Batch(keep_states=True)``); rollback copies the state
     after token ``a``. This is exact by construction (each kept state *is* the state a one-token decode
     step would have reached, same kernel) and costs ``(k+1)`` copies of the small per-layer state, no
     recomputation. The alternative, snapshot + re-running the accepted prefix, saves that memory but
     adds a second pass over the GDN layers whenever a draft is rejected (most rounds with a weak drafter),
     and a chunked verify kernel would not produce the one-token kernel's numbers. The conv state kept
     after token ``a`` is the last ``W-1`` accepted conv inputs.

Greedy only (``temperature=0``): the output is the plain greedy decoding's, whatever the drafter proposes;
the drafter only changes how many forwards it takes. Batch 1. Per round the host reads one number (the
accepted count); drafting, verifying and rolling back stay on the device. On CUDA (TP = EP = 1) the verify
forward of each width k+1 is captured once as a CUDA graph (`cuda_graph.GraphedStep`: fed tokens and
positions in, logits, hidden states and the kept GDN states out): an eager forward at batch 1 is
launch-bound (13.8 ms vs 1.3 ms graphed on the reduced model, H200), which would eat any gain.

Drafters: `MTPDrafter` (the checkpoint's multi-token-prediction block) or any object with `propose`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator, List, Optional

import torch

from ..field_checks import check_speculative  # noqa: F401 (stdlib-only home, re-exported)

from .cuda_graph import GraphedStep
from .forward import Batch, _add, attention_forward, forward
from .state import GDNSlot, KVSlot


class Drafter:
    """Proposes the next ``k`` tokens of a sequence.

    ``propose(tokens, hidden, k) -> [k]`` ids (on any device):

    * ``tokens [n]``: every accepted token so far (prompt + generated); the last one is the model's latest
      choice, not yet fed to it.
    * ``hidden [m, H]`` (only if ``needs_hidden``): the model's last-layer output (before the final norm) at
      positions ``n-1-m .. n-2``, each the state that chose the token after it: the positions that became
      final since the previous call (``m = n - 1`` the first time, then ``a + 1`` per round). A drafter
      with a cache of its own keeps positions ``< n-1-m`` and overwrites the rest (its rejected drafts).
    """

    needs_hidden = False

    def propose(self, tokens: torch.Tensor, hidden: Optional[torch.Tensor], k: int) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class SpeculativeStats:
    """What speculation did for one `generate` call: ``acceptance_rate`` = accepted / drafted tokens."""

    rounds: int = 0  # verify forwards
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0  # new tokens, the prefill's first one included
    accepted_per_round: List[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        """New tokens per verify forward (1 = no gain over plain decoding)."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

    def __str__(self) -> str:
        return (f"speculative: {self.accepted}/{self.drafted} drafted tokens accepted "
                f"({100 * self.acceptance_rate:.1f} %), {self.tokens_per_round:.2f} tokens per verify forward")


def accept_count(drafts: torch.Tensor, greedy: torch.Tensor) -> torch.Tensor:
    """``drafts [B, k]``, the model's choices ``greedy [B, k+1]`` -> ``[B]``: length of the agreeing prefix."""
    return (drafts == greedy[:, :-1]).long().cumprod(1).sum(1)


def rollback(state, gdn_states, keep: torch.Tensor) -> None:
    """Set every GDN slot to its state after token ``keep[b]`` of the verify step (``[B]``, on the device)."""
    rows = torch.arange(keep.numel(), device=keep.device)
    slots = [s for s in state.slots if isinstance(s, GDNSlot)]
    for slot, (conv, recurrent) in zip(slots, gdn_states, strict=True):  # [s, B, ...] each
        slot.conv.copy_(conv[keep, rows])
        slot.recurrent.copy_(recurrent[keep, rows])


def make_drafter(model, draft) -> Drafter:
    """``draft``: ``"mtp"`` (the model's MTP block) or an object with ``propose``."""
    if draft == "mtp":
        return MTPDrafter(model)
    if not callable(getattr(draft, "propose", None)):
        raise ValueError(f"draft = {draft!r}: use 'mtp' or a Drafter (an object with propose(tokens, hidden, k))")
    return draft


class SpeculativeStream:
    """Iterator over the new tokens (``[1]`` each) of greedy speculative decoding; ``stats`` as it goes.

    ``dec`` is a fresh `Decoder` of batch 1 (eager forwards: the verify step has a varying width).
    """

    def __init__(self, dec, prompt: torch.Tensor, max_new_tokens: int, k: int, drafter,
                 eos_token_id: Optional[int] = None, stats: Optional[SpeculativeStats] = None,
                 cuda_graph: bool = False, graphs: Optional[dict] = None):
        self.dec, self.k, self.drafter, self.eos = dec, int(k), drafter, eos_token_id
        # width -> GraphedStep; a caller may pass the dict of an earlier stream over the same `dec` to replay its
        # captures (they read `dec`'s state tensors, which a new prefill rewrites in place)
        self.cuda_graph, self._graphs = cuda_graph, ({} if graphs is None else graphs)
        self.prompt, self.max_new = prompt.to(dec.device), max_new_tokens
        self.stats = SpeculativeStats() if stats is None else stats
        if cuda_graph and callable(getattr(drafter, "enable_cuda_graph", None)):
            drafter.enable_cuda_graph()
        self._it = self._run()

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        return next(self._it)

    def _verify_step(self, tokens: torch.Tensor, positions: torch.Tensor):
        """``tokens``, ``positions [s, 1]`` -> logits ``[s, 1, V]``, hidden ``[s, 1, H]``, kept GDN states."""
        dec = self.dec
        batch = Batch(positions, keep_states=True)
        logits, h = forward(dec.model, dec.state, tokens, batch, dec.rope, dec.sync_free, return_hidden=True)
        return logits.reshape(tokens.shape[0], 1, -1), h, batch.gdn_states

    def _verify(self, fed: torch.Tensor, positions: torch.Tensor):
        s = fed.numel()
        if self.cuda_graph and s not in self._graphs:
            try:
                self._graphs[s] = GraphedStep(self._verify_step, (fed[:, None], positions), self.dec.state.tensors())
            except Exception as e:  # the eager verify is the same math
                warnings.warn(f"verify step not captured as a CUDA graph ({type(e).__name__}: {e}); running eager")
                torch.cuda.synchronize()
                self.cuda_graph = False
        if s in self._graphs:
            logits, h, kept = self._graphs[s](fed[:, None], positions)
            return logits, h.clone(), kept  # the graph's buffers: the next replay overwrites them
        return self._verify_step(fed[:, None], positions)

    def _run(self) -> Iterator[torch.Tensor]:
        dec = self.dec
        T = self.prompt.numel()
        seq = torch.empty(T + self.max_new, dtype=torch.long, device=dec.device)  # accepted tokens
        seq[:T] = self.prompt
        want_hidden = getattr(self.drafter, "needs_hidden", False)
        with torch.no_grad():
            logits, hidden = dec.prefill([self.prompt], return_hidden=True)
            hidden = hidden[:, 0]  # [T, H]
            seq[T] = logits[0].argmax(-1)
            n = T + 1  # accepted tokens; seq[n-1] is not yet in the state, at position n-1
            self.stats.emitted = 1
            yield seq[T:T + 1]
            if self.eos is not None and int(seq[T]) == self.eos:
                return
            while n - T < self.max_new:
                k = min(self.k, self.max_new - (n - T) - 1)  # never past max_new_tokens (and the cache)
                if k > 0:
                    drafts = self.drafter.propose(seq[:n], hidden if want_hidden else None, k)
                    drafts = drafts.to(dec.device, torch.long).view(k)
                else:
                    drafts = seq[:0]
                fed = torch.cat([seq[n - 1:n], drafts])  # [k+1]
                positions = dec.positions + torch.arange(k + 1, device=dec.device)[:, None]  # [k+1, 1]
                logits, h, kept = self._verify(fed, positions)
                greedy = logits.reshape(k + 1, -1).argmax(-1)  # [k+1]
                a_dev = accept_count(drafts[None], greedy[None])  # [1]
                rollback(dec.state, kept, a_dev)
                dec.positions += a_dev + 1
                a = int(a_dev)  # the round's one host sync
                seq[n:n + a] = drafts[:a]
                seq[n + a] = greedy[a]
                hidden = h[: a + 1, 0]
                self.stats.rounds += 1
                self.stats.drafted += k
                self.stats.accepted += a
                self.stats.accepted_per_round.append(a)
                stop = a + 1
                if self.eos is not None:  # one more read per round, not per token
                    hits = (seq[n:n + a + 1] == self.eos).nonzero()
                    stop = int(hits[0]) + 1 if hits.numel() else stop
                for i in range(stop):
                    self.stats.emitted += 1
                    yield seq[n + i:n + i + 1]
                if stop <= a:
                    return
                n += a + 1


class MTPDrafter(Drafter):
    """Drafts with the model's multi-token-prediction layer (`modules.mtp`), which keeps its own KV cache.

    MTP at position t reads the main model's state at t (after the final norm) and the embedding of token
    t+1, and predicts token t+2. Each `propose` first runs the layer over the ``m`` positions that became
    final (their main-model states: the catch-up, overwriting the cache rows of rejected drafts), then
    drafts autoregressively: step j > 1 uses the MTP layer's own previous output (after ``mtp.norm``) as its
    "hidden" input with the embedding of draft j-1, at the next position (as vLLM and DeepSeek-V3 chain one
    MTP layer for k > 1; the layer was trained for one step, so later drafts are weaker).
    """

    needs_hidden = True

    def __init__(self, model, depth: int = 0):
        from ..modules.mtp import has_mtp, mtp_parts

        if not has_mtp(model):
            raise ValueError("draft='mtp' needs a model with an MTP block (num_nextn_predict_layers >= 1); "
                             "pass a Drafter or speculative_k=None")
        self.model, self.p = model, mtp_parts(model, depth)
        self.slot, self.rope = None, None
        self.cuda_graph, self._graphs = False, {}  # (m, k) -> (cache pointers, GraphedStep), None: capture failed

    def enable_cuda_graph(self) -> None:
        """Replay each round's drafting (catch-up over ``m <= k+1`` positions and the ``k-1`` chained steps)
        from a CUDA graph per ``(m, k)``: eager, it is ~1 + k launch-bound MTP-layer forwards at batch 1
        (6-8 ms a round on the reduced model, H200, against a 1.3 ms graphed decode step). `SpeculativeStream`
        turns this on where it graphs its verify step."""
        self.cuda_graph = True

    def _ensure(self, length: int, device, dtype):
        """A KV cache of at least ``length`` positions, grown geometrically with its entries kept."""
        old = self.slot
        if old is not None and old.k.shape[2] >= length:
            return
        length = max(length, 2 * old.k.shape[2]) if old is not None else max(length, 64)
        length = min(length, self.model.config.max_position_embeddings) if length > 64 else length
        m = self.p.layer.self_attention
        shape = (1, m.num_query_groups_per_partition, length, m.hidden_size_per_attention_head)
        self.slot = KVSlot(k=torch.zeros(shape, device=device, dtype=dtype), v=torch.zeros(shape, device=device,
                                                                                         dtype=dtype))
        if old is not None:
            n = old.k.shape[2]
            self.slot.k[:, :, :n], self.slot.v[:, :, :n] = old.k, old.v
        self.rope = self.model.rotary_pos_emb(length)

    def _layer(self, h_normed: torch.Tensor, next_tokens: torch.Tensor, positions: torch.Tensor):
        """``h_normed [s, 1, H]`` (post-norm), ``next_tokens [s]`` at ``positions [s]`` -> (logits [s, V], out)."""
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        p, model = self.p, self.model
        pos = positions[:, None]  # [s, 1]
        emb = model.embedding(input_ids=next_tokens[None], position_ids=pos.t())  # [s, 1, H]
        x, _ = p.fc(torch.cat([p.pre_fc_norm_embedding(emb), p.pre_fc_norm_hidden(h_normed)], dim=-1))
        x = gather_from_tensor_model_parallel_region(x)
        layer = p.layer
        freqs = self.rope[:, 0, 0][pos].unsqueeze(2)
        x = _add(x, attention_forward(layer.self_attention, layer.input_layernorm(x), self.slot, Batch(pos), freqs))
        x = _add(x, layer.mlp(layer.pre_mlp_layernorm(x)))
        out = p.norm(x)
        weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
        logits, _ = model.output_layer(out, weight=weight, runtime_gather_output=True)
        return logits[:, 0], out

    @torch.no_grad()
    def propose(self, tokens: torch.Tensor, hidden: torch.Tensor, k: int) -> torch.Tensor:
        n, m = tokens.numel(), hidden.shape[0]
        self._ensure(n + k, tokens.device, hidden.dtype)
        start = n - 1 - m
        positions = torch.arange(start, n - 1, device=tokens.device)
        args = (hidden, tokens[start + 1:n], positions)
        if self.cuda_graph and hidden.is_cuda and m <= k + 1:  # the first call's m is the prompt: eager
            key, ptrs = (m, k), self._cache_ptrs()
            g = self._graphs.get(key)
            if key not in self._graphs or (g is not None and g[0] != ptrs):  # new, or the cache grew: (re)capture
                try:  # no state to restore: warm-up rewrites the cache rows the replay writes, with the same values
                    g = (ptrs, GraphedStep(partial(self._propose, k=k), args))
                except Exception as e:  # the eager drafting is the same math
                    warnings.warn(f"MTP drafting not captured as a CUDA graph ({type(e).__name__}: {e}); running eager")
                    torch.cuda.synchronize()
                    g = None
                self._graphs[key] = g
            if g is not None:
                return g[1](*args).clone()  # the graph's buffer: the next replay overwrites it
        return self._propose(*args, k=k)

    def _cache_ptrs(self) -> tuple:
        """Where the captured drafting reads its KV cache and RoPE table (`_ensure` reallocates them)."""
        return self.slot.k.data_ptr(), self.slot.v.data_ptr(), self.rope.data_ptr()

    def _propose(self, hidden: torch.Tensor, next_tokens: torch.Tensor, positions: torch.Tensor, k: int):
        """The drafting math: ``hidden [m, H]`` (pre-final-norm states at ``positions [m]``), ``next_tokens [m]``
        -> ``[k]`` drafts (the catch-up, then ``k - 1`` chained MTP steps)."""
        h = self.model.decoder.final_layernorm(hidden[:, None])  # [m, 1, H]
        logits, out = self._layer(h, next_tokens, positions)
        drafts = [logits[-1].argmax(-1)]
        for j in range(1, k):
            logits, out = self._layer(out[-1:], drafts[-1].view(1), positions[-1:] + j)
            drafts.append(logits[-1].argmax(-1))
        return torch.stack(drafts)

