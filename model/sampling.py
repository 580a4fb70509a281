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
    return filter_rows(logits[None], [settings])[0]


def filter_rows(logits: torch.Tensor, settings: list) -> torch.Tensor:
    """Temperature, top-k and top-p on rows [B, V], each row with its own settings."""
    temps = torch.tensor([s.temperature for s in settings], dtype=logits.dtype)
    if bool((temps != 1.0).any()):
        logits = logits / temps[:, None]
    else:
        logits = logits.clone()
    for row, s in enumerate(settings):
        if s.top_k and s.top_k < logits.shape[-1]:
            kth = torch.topk(logits[row], s.top_k).values[-1]
            logits[row] = logits[row].masked_fill(logits[row] < kth, float("-inf"))
    top_p = torch.tensor([s.top_p for s in settings], dtype=logits.dtype)
    if bool((top_p < 1.0).any()):
        logits = _top_p_rows(logits, top_p)
    return logits


def _top_p_rows(logits: torch.Tensor, top_p: torch.Tensor, candidates: int = 1024) -> torch.Tensor:
    """Keep each row's most likely tokens until their mass reaches its `top_p` (the reference's rule).

    The reference sorts the whole vocabulary. The kept set usually lies within the top
    `candidates` tokens, which a partial top-k finds much faster. For a flat row (random
    weights) the probability threshold is narrowed by bisection for all such rows at
    once, and only the few tokens left near it are sorted.
    """
    B, V = logits.shape
    probs = logits.softmax(-1)
    k = min(candidates, V)
    top, order = torch.topk(probs, k)
    before = top.cumsum(-1) - top  # mass of the more likely tokens
    keep_top = before < top_p[:, None]
    keep_top[:, 0] = True  # always keep the most likely token
    remove = torch.ones_like(logits, dtype=torch.bool).scatter_(1, order, ~keep_top)
    flat = [b for b in range(B) if top_p[b] < 1.0 and k < V and float(top[b].sum()) < float(top_p[b])]
    if flat:
        remove[flat] = _threshold_rows(probs[flat], top_p[flat], top[flat, -1])
    remove[top_p >= 1.0] = False
    return logits.masked_fill(remove, float("-inf"))


def _threshold_rows(probs: torch.Tensor, top_p: torch.Tensor, hi: torch.Tensor, steps: int = 6) -> torch.Tensor:
    """Which tokens top-p removes, for rows whose kept set is larger than a top-k can hold."""
    lo = torch.zeros_like(hi)  # invariant: mass(p >= lo) >= top_p > mass(p >= hi)
    for _ in range(steps):
        mid = (lo + hi) / 2
        enough = torch.where(probs >= mid[:, None], probs, 0.0).sum(-1) >= top_p
        lo = torch.where(enough, mid, lo)
        hi = torch.where(enough, hi, mid)
    remove = probs < hi[:, None]
    mass = torch.where(remove, 0.0, probs).sum(-1)
    band = remove & (probs >= lo[:, None])
    for row in range(probs.shape[0]):  # add the band's tokens, most likely first, until the mass is reached
        index = band[row].nonzero().squeeze(1)
        values, order = torch.sort(probs[row, index], descending=True)
        before = float(mass[row]) + values.cumsum(0) - values
        remove[row, index[order[before < float(top_p[row])]]] = False
    return remove


def greedy_choice(logits: torch.Tensor, rank: int = 0) -> int:
    """The `rank`-th most likely token, never past the allowed (finite) ones."""
    # A masked (-inf) token would break the healing constraint.
    rank = max(0, min(rank, int(torch.isfinite(logits).sum()) - 1))
    if rank == 0:
        return int(torch.argmax(logits))
    return int(torch.topk(logits, rank + 1).indices[rank])


def sample_rows(logits: torch.Tensor, settings: list, generators: list, ranks: list) -> list[int]:
    """One token per row of processed logits [B, V]; each sampled row draws from its own generator.

    Sampling inverts each row's cumulative distribution at one uniform number, so a batch
    costs a few vectorised passes however many rows it has.
    """
    tokens = [0] * len(settings)
    sampled = []
    for row, s in enumerate(settings):
        if s.greedy:
            tokens[row] = greedy_choice(logits[row], ranks[row])
        else:
            sampled.append(row)
    if sampled:
        probs = filter_rows(logits[sampled], [settings[r] for r in sampled]).softmax(-1)
        cdf = probs.cumsum(-1)
        u = torch.tensor([float(torch.rand(1, generator=generators[r])) for r in sampled], dtype=cdf.dtype)
        picks = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
        picks = picks.clamp(max=probs.shape[-1] - 1)
        for j, row in enumerate(sampled):
            pick = int(picks[j])
            if probs[j, pick] <= 0:  # only a rounding edge can land here: take the last possible token
                pick = int(probs[j].nonzero()[-1])
            tokens[row] = pick
    return tokens


def choose(logits: torch.Tensor, settings: SamplingSettings, generator: Optional[torch.Generator],
           rank: int = 0) -> int:
    """One token from one row of processed logits. Greedy takes the `rank`-th most likely token."""
    return sample_rows(logits[None], [settings], [generator], [rank])[0]
