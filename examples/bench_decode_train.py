"""Train the `bench_decode` model, MTP layer included, on a synthetic stream that it can learn.

Why: with random weights the logits over 151936 ids are nearly flat, so bf16 near-ties flip greedy tokens
and an MTP layer drafts noise; speculative decoding can only be judged on a model whose next-token and
next-next-token distributions are peaked. A few hundred steps on this stream give such a model.

The corpus (`MarkovCorpus`): ``symbols`` token ids drawn once from the vocabulary; a sparse second-order
Markov chain over them. The next symbol depends on the previous one, ``x[t-1]``, and on the class (one of
``classes``, fixed at random per symbol) of the one before, ``x[t-2]``: each of the ``classes * symbols``
contexts has one dominant next symbol with probability ``p`` and ``alternatives`` other distinct symbols
sharing ``1 - p`` equally. Every context has the same law, so the entropy rate is exactly
``H = -p ln p - (1 - p) ln((1 - p) / alternatives)`` (0.435 nats for 0.9 and 3): the floor of the LM loss,
and of the MTP loss too (token t+2 given the tokens up to t+1 is the same one-step law). Streams start at
two uniform symbols. Small enough to learn in ~2M tokens (each context is seen hundreds of times), and
predicting it needs two tokens of context (the GDN conv or attention), not a bigram table alone.

Training (`train`): the model's own loss path, as our training runs it: ``model(ids, pos, labels=...)``
returns the per-token LM loss and attaches ``mtp_loss_scaling_factor / mtp_num_layers * MTP loss`` to the
hidden states (`modules.mtp.mtp_postprocess`, megatron's `MTPLossAutoScaler`), so backward of the mean
LM loss trains both; the MTP loss is read from `MTPLossTracker`. Plain torch AdamW (betas 0.9/0.95, weight
decay 0.1, grad clip 1), linear warm-up then cosine to lr/10; bf16 parameters get fp32 master copies
(the optimizer steps those, the model gets them rounded back), as megatron's mixed-precision optimizer does.
"""

from __future__ import annotations

import math
import time

import torch


class MarkovCorpus:
    """The seeded chain of the module doc; `sample` draws streams of token ids from it."""

    def __init__(self, vocab: int, symbols: int = 1024, classes: int = 4, p: float = 0.9, alternatives: int = 3,
                 seed: int = 0):
        if not 1 + alternatives <= symbols <= vocab:
            raise ValueError(f"corpus symbols = {symbols}: need {1 + alternatives} <= symbols <= vocab ({vocab}); "
                             f"set --decode-train-symbols in that range")
        if not 0.0 < p < 1.0:
            raise ValueError(f"corpus p = {p}: the dominant-token probability must be in (0, 1)")
        g = torch.Generator().manual_seed(seed)
        self.vocab, self.symbols, self.classes, self.p, self.alternatives, self.seed = (
            vocab, symbols, classes, p, alternatives, seed)
        self.ids = torch.randperm(vocab, generator=g)[:symbols]  # symbol -> token id
        self.cls = torch.randint(0, classes, (symbols,), generator=g)
        # per context (class, prev): 1 + alternatives distinct next symbols, the first one dominant; sorted
        # draws from [1, S - A] plus 0..A-1 are distinct offsets in [1, S - 1]
        dom = torch.randint(0, symbols, (classes, symbols, 1), generator=g)
        off = torch.randint(1, symbols - alternatives + 1, (classes, symbols, alternatives), generator=g)
        off = off.sort(-1).values + torch.arange(alternatives)
        self.next = torch.cat([dom, (dom + off) % symbols], -1)  # [classes, symbols, 1 + A]

    def entropy_floor(self) -> float:
        """Entropy rate of the chain (nats per token): the LM (and MTP) loss of a perfect model."""
        q = (1 - self.p) / self.alternatives
        return -self.p * math.log(self.p) - (1 - self.p) * math.log(q)

    def sample(self, rows: int, length: int, seed: int) -> torch.Tensor:
        """``[rows, length]`` token ids (CPU), one stream per row; vectorised over rows."""
        g = torch.Generator().manual_seed(seed)
        s = torch.empty(rows, length, dtype=torch.long)
        s[:, :2] = torch.randint(0, self.symbols, (rows, 2), generator=g)
        dominant = torch.rand(rows, length, generator=g) < self.p
        alt = torch.randint(1, 1 + self.alternatives, (rows, length), generator=g)
        choice = torch.where(dominant, torch.zeros_like(alt), alt)
        for t in range(2, length):
            s[:, t] = self.next[self.cls[s[:, t - 2]], s[:, t - 1], choice[:, t]]
        return self.ids[s]

    def dominant_rate(self, prompt: torch.Tensor, new: torch.Tensor) -> float:
        """Fraction of the generated tokens ``new [B, n]`` (after ``prompt [B, T]``, T >= 2) that are the chain's
        dominant next token given the two before: how well greedy decoding has learnt the chain (1 = all)."""
        seq = torch.cat([prompt, new], 1).cpu()
        sym = torch.full((self.vocab,), -1, dtype=torch.long)
        sym[self.ids] = torch.arange(self.symbols)
        s, T = sym[seq], prompt.shape[1]
        prev2, prev1, nxt = s[:, T - 2:-2], s[:, T - 1:-1], s[:, T:]
        dom = self.next[self.cls[prev2.clamp(min=0)], prev1.clamp(min=0), 0]
        return ((dom == nxt) & (prev2 >= 0) & (prev1 >= 0)).float().mean().item()

    def describe(self) -> dict:
        return dict(kind="sparse second-order Markov chain: next = f(class(x[t-2]), x[t-1])", symbols=self.symbols,
                    classes=self.classes, p_dominant=self.p, alternatives=self.alternatives, seed=self.seed,
                    entropy_floor_nats=round(self.entropy_floor(), 4))


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``lr`` to ``lr / 10`` at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup - 1)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(frac, 1.0))))


def train(model, corpus: MarkovCorpus, steps: int, batch: int, seq: int, info: dict, lr: float = 1e-3,
          warmup: int = None, seed: int = 1, log_every: int = 20, log=None) -> dict:
    """Train ``model`` for ``steps`` steps of ``batch`` x ``seq`` tokens; fill ``info`` as it goes (a failure
    midway leaves the steps done in it), return it. The model is left in eval mode, gradients freed."""
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    from nemo_qwen3_next.modules.mtp import MTPLossTracker, has_mtp

    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    warmup = max(1, steps // 10) if warmup is None else warmup
    log = log or (lambda line: print(line, flush=True))
    mtp = has_mtp(model)
    info.update(steps=steps, batch=batch, seq_len=seq, lr=lr, warmup_steps=warmup, completed_steps=0,
                optimizer="torch AdamW(0.9, 0.95), wd 0.1, clip 1.0, cosine to lr/10",
                loss="lm + mtp_loss_scaling_factor * mtp" if mtp else "lm (no MTP layer)",
                mtp_loss_scaling_factor=model.config.mtp_loss_scaling_factor if mtp else None,
                corpus=corpus.describe(), log=[])
    t0 = time.perf_counter()
    data = corpus.sample(steps * batch, seq + 1, seed)  # [steps * batch, seq + 1]: inputs and labels
    info["corpus_s"] = round(time.perf_counter() - t0, 2)
    params = [p for p in model.parameters() if p.requires_grad]
    master = [p.detach().float() if p.dtype != torch.float32 else p for p in params]
    low = [(m, p) for m, p in zip(master, params) if m is not p]  # bf16 parameters and their fp32 masters
    opt = torch.optim.AdamW(master, lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
    MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0, device=device))  # the MTP gradient = its loss's, unscaled
    MTPLossTracker.pop()
    pos = torch.arange(seq, device=device)[None].expand(batch, seq)
    lm_hist, mtp_hist = [], []
    model.train()
    try:
        sync()
        t1 = time.perf_counter()
        for step in range(steps):
            rows = data[step * batch:(step + 1) * batch].to(device, non_blocking=True)
            loss = model(rows[:, :-1], pos, None, labels=rows[:, 1:].contiguous())  # [b, s] per-token LM loss
            lm = loss.float().mean()
            lm.backward()
            tracked = MTPLossTracker.pop()
            lm_hist.append(lm.detach())
            if mtp:
                mtp_hist.append(tracked[0])
            for m, p in low:
                m.grad, p.grad = (None if p.grad is None else p.grad.float()), None
            torch.nn.utils.clip_grad_norm_(master, 1.0)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr, warmup)
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.zero_grad(set_to_none=True)
            if low:
                with torch.no_grad():
                    torch._foreach_copy_([p for _, p in low], [m for m, _ in low])  # rounded to bf16
            if (step + 1) % log_every == 0 or step + 1 == steps:
                sync()
                ms = (time.perf_counter() - t1) / (step + 1) * 1e3
                rec = dict(step=step + 1, lm_loss=round(lm_hist[-1].item(), 4), ms_per_step=round(ms, 1))
                if mtp:
                    rec["mtp_loss"] = round(mtp_hist[-1].item(), 4)
                info["log"].append(rec)
                mtp_txt = f" | mtp {rec['mtp_loss']:.3f}" if mtp else ""
                log(f"train {step + 1}/{steps} | lm {rec['lm_loss']:.3f}{mtp_txt} | floor {corpus.entropy_floor():.3f}"
                    f" | {ms:.0f} ms/step")
            info["completed_steps"] = step + 1
        sync()
        info["train_s"] = round(time.perf_counter() - t1, 2)
    finally:  # also after a failure: the decode rows run next, on what was trained
        model.zero_grad(set_to_none=True)
        del opt, master, low
        model.eval()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _summarise(info, lm_hist, mtp_hist)
    return info


def _summarise(info, lm_hist, mtp_hist):
    """First and final losses (the final one: mean of the last 10 steps), every step's losses."""
    for name, hist in (("lm", lm_hist), ("mtp", mtp_hist)):
        if hist:
            v = torch.stack(hist).float().cpu()
            info[f"first_{name}_loss"] = round(v[0].item(), 4)
            info[f"final_{name}_loss"] = round(v[-10:].mean().item(), 4)
            info[f"{name}_losses"] = [round(x, 4) for x in v.tolist()]
