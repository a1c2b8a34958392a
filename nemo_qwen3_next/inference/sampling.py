"""Next-token choice: greedy, or temperature + top-k + top-p (nucleus) sampling, without host syncs.

Order as in HF's logits processors: divide by the temperature, keep the top-k logits, keep the
nucleus (the smallest set of most probable tokens whose probability reaches ``top_p``), sample.
Sampling uses the exponential-race form of a categorical draw (``argmax(p / E)``, E ~ Exp(1)):
the same distribution as `torch.multinomial`, one seeded generator, and no data-dependent shapes.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..field_checks import check_sampling  # noqa: F401 (stdlib-only home, re-exported)


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """``logits [..., V]`` with ``-inf`` outside the top-k and outside the nucleus (ties at the k-th kept)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, int(top_k), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the more probable tokens
        drop = before >= top_p  # the most probable token is always kept (before = 0)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``logits [B, V]`` -> ``[B]`` token ids."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(-1)
