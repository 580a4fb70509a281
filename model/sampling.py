"""Turning next-token logits into a choice: the reference's processors, row by row in a batch.

Order as in the reference: repetition penalty on the raw logits, then temperature,
top-k and top-p. Each row has its own settings and its own random generator, so a row's
choices do not depend on which other rows share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class SamplingSettings:
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The reference's rule: a seen token's logit is divided by `penalty` if positive, multiplied if negative."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(-1, seen, picked)


def filter_logits(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """Temperature, top-k and top-p on one row [V] of float32 logits (masked entries become -inf)."""
    if settings.temperature != 1.0:
        logits = logits / settings.temperature
    if settings.top_k and settings.top_k < logits.shape[-1]:
        kth = torch.topk(logits, settings.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        logits = _top_p(logits, settings.top_p)
    return logits


def _top_p(logits: torch.Tensor, top_p: float, candidates: int = 1024) -> torch.Tensor:
    """Keep the most likely tokens until their mass reaches `top_p` (the reference's rule).

    The kept set usually lies within the top `candidates` tokens, which a partial top-k
    finds much faster than sorting the whole vocabulary. When it does not (a flat
    distribution), the probability threshold of the kept set is found by bisection.
    """
    probs = logits.softmax(-1)
    k = min(candidates, probs.shape[-1])
    top, order = torch.topk(probs, k)
    before = top.cumsum(-1) - top  # mass of the more likely tokens
    if k == probs.shape[-1] or float(before[-1] + top[-1]) >= top_p:
        keep = before < top_p
        keep[0] = True  # always keep the most likely token
        mask = torch.ones_like(logits, dtype=torch.bool)
        mask[order[keep]] = False
        return logits.masked_fill(mask, float("-inf"))
    lo, hi = 0.0, float(top[k - 1])  # the kept set's smallest probability lies in [lo, hi]
    for _ in range(40):
        mid = (lo + hi) / 2
        if float(torch.where(probs >= mid, probs, 0.0).sum()) >= top_p:
            lo = mid
        else:
            hi = mid
    return logits.masked_fill(probs < lo, float("-inf"))


def choose(logits: torch.Tensor, settings: SamplingSettings, generator: Optional[torch.Generator],
           rank: int = 0) -> int:
    """One token from one row of processed logits. Greedy takes the `rank`-th most likely token."""
    if settings.greedy:
        # Never past the allowed tokens: a masked (-inf) one would break the healing constraint.
        rank = max(0, min(rank, int(torch.isfinite(logits).sum()) - 1))
        if rank == 0:
            return int(torch.argmax(logits))
        return int(torch.topk(logits, rank + 1).indices[rank])
    probs = filter_logits(logits, settings).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
