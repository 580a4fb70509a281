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
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= (1 - settings.top_p)
        remove[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


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
