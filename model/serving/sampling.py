"""Turning next-token logits into a choice: the reference's processors, row by row in a batch.

Order as in the reference: repetition penalty on the raw logits (then OpenAI's presence and
frequency penalties, for the requests that set them), then temperature, top-k and top-p. Each row has its own settings and its own random generator, so a row's
choices do not depend on which other rows share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


MAX_DRAWS = 64  # rejection rounds; each accepts with probability >= the top token's


@dataclass
class SamplingSettings:
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The reference's rule: a seen token's logit is divided by `penalty` if positive, multiplied if negative."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(-1, seen, picked)


def apply_presence_frequency(logits: torch.Tensor, generated: list, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's penalties, over the tokens generated so far (not the prompt): a token's logit less
    `frequency` times its count, less `presence` once if it occurs at all."""
    if (presence == 0.0 and frequency == 0.0) or not generated:
        return logits
    ids, counts = torch.tensor(generated, dtype=torch.long).unique(return_counts=True)
    penalty = counts.to(logits.dtype) * frequency + presence
    return logits.scatter(-1, ids, logits.gather(-1, ids) - penalty)


def greedy_choice(logits: torch.Tensor, rank: int = 0) -> int:
    """The `rank`-th most likely token, never past the allowed (finite) ones."""
    if rank == 0:
        return int(torch.argmax(logits))
    # A masked (-inf) token would break the healing constraint.
    rank = max(0, min(rank, int(torch.isfinite(logits).sum()) - 1))
    if rank == 0:
        return int(torch.argmax(logits))
    return int(torch.topk(logits, rank + 1).indices[rank])


def sample_rows(logits: torch.Tensor, settings: list, generators: list, ranks: list) -> list[int]:
    """One token per row of processed logits [B, V]; each sampled row draws from its own generator.

    Temperature and top-k as the reference applies them; top-p by rejection: a token drawn
    from the whole distribution is kept when the tokens more likely than it hold less than
    `top_p` of the mass, which is exactly the reference's kept set. No sort of the
    vocabulary is needed, and a batch costs a few vectorised passes however many rows it has.
    """
    tokens = [0] * len(settings)
    sampled = []
    for row, s in enumerate(settings):
        if s.greedy:
            tokens[row] = greedy_choice(logits[row], ranks[row])
        else:
            sampled.append(row)
    if not sampled:
        return tokens
    x = logits if len(sampled) == len(settings) else logits[sampled]
    temps = [settings[r].temperature for r in sampled]
    if any(t != 1.0 for t in temps) or any(settings[r].top_k for r in sampled):
        x = x / torch.tensor(temps, dtype=x.dtype)[:, None]  # a new tensor: the caller's logits stay as they were
    for j, r in enumerate(sampled):
        k = settings[r].top_k
        if k and k < x.shape[-1]:
            x[j] = x[j].masked_fill(x[j] < torch.topk(x[j], k).values[-1], float("-inf"))
    probs = x.softmax(-1)
    cdf = probs.cumsum(-1)
    top_p = torch.tensor([settings[r].top_p for r in sampled], dtype=probs.dtype)
    pending = list(range(len(sampled)))
    for _ in range(MAX_DRAWS):
        u = torch.tensor([float(torch.rand(1, generator=generators[sampled[j]])) for j in pending], dtype=cdf.dtype)
        rows = torch.tensor(pending)
        all_rows = len(pending) == probs.shape[0]
        p_rows, c_rows = (probs, cdf) if all_rows else (probs[rows], cdf[rows])
        picks = torch.searchsorted(c_rows, (u * c_rows[:, -1])[:, None], right=True).squeeze(1)
        picks = picks.clamp(max=probs.shape[-1] - 1)
        p_pick = p_rows[torch.arange(len(pending)), picks]
        above = torch.where(p_rows > p_pick[:, None], p_rows, 0.0).sum(-1)
        accepted = (above < top_p[rows]) & (p_pick > 0)
        still = []
        for j, pick, ok in zip(pending, picks.tolist(), accepted.tolist()):
            if ok:
                tokens[sampled[j]] = pick
            else:
                still.append(j)
        pending = still
        if not pending:
            break
    for j in pending:  # only after MAX_DRAWS rejections in a row: take the most likely token
        tokens[sampled[j]] = int(torch.argmax(probs[j]))
    return tokens


def choose(logits: torch.Tensor, settings: SamplingSettings, generator: Optional[torch.Generator],
           rank: int = 0) -> int:
    """One token from one row of processed logits. Greedy takes the `rank`-th most likely token."""
    return sample_rows(logits[None], [settings], [generator], [rank])[0]
