"""What runs next: which waiting requests get slots, which prompt chunks are prefilled, which rows decode.

Requests are admitted oldest first while the slot pool has room (a request that cannot get
its slots holds back the ones behind it, so none starves). Each step prefills at most
PREFILL_CHUNK prompt tokens in all, so decoding rows keep moving while a long prompt is read;
chunks of the same length are grouped so they go through the model together.

Older requests come first, in prefill as in decoding. While older requests decode, a younger
prompt whose rest fits in PREFILL_BEHIND_DECODE tokens (a keystroke: the rest of its document
is reused from the cache) is prefilled at once and decodes in the same steps. A longer one
waits for them when its prefill would delay them, all together, WAIT_MARGIN times more than
their remaining decode steps would delay it. On a CPU a gpt2-size prompt of 1,000 tokens takes
seconds while a suggestion of a few words has a few tenths of a second of decoding left, so it
waits: prefilled beside them, it would make each of their decode steps as long as a prefill
chunk, and under load every answer would take as long as the whole backlog. Behind a long
generation (hundreds of tokens still to go), or on a small model whose prefill is cheap, it
goes on at once. The costs come from the engine's recent pace (backlog.py); before it is
known, nothing waits. Younger requests never hold back older ones, so none starves.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Optional

from .jobs import Job, Row
from .slots import SlotPool

PREFILL_CHUNK = 256  # prompt tokens prefilled per step, in all
PREFILL_BEHIND_DECODE = 32  # a younger prompt's rest this short is prefilled beside older decoding at once
WAIT_MARGIN = 2.0  # a longer one waits only when prefilling it now costs the older requests this much more


def steps_left(job: Job) -> int:
    """Decode steps until a decoding request's current rows have all reached max_new_tokens."""
    return max((job.max_new_tokens - len(row.tokens) for row in job.live_rows()), default=0)


def should_wait(left: int, older: list[Job], pace: tuple[Optional[float], Optional[float]]) -> bool:
    """Whether a prompt with `left` tokens to prefill should wait for the `older` requests to
    finish decoding: prefilling it now delays each of them by its prefill time, waiting delays it
    by their remaining decode steps. It waits only when prefilling now costs WAIT_MARGIN times
    more, as waiting has costs this does not count: its own decoding then runs beside fewer rows,
    and the requests after it wait behind it."""
    per_token, per_step = pace
    if per_token is None or per_step is None:
        return False
    waiting = max(steps_left(job) for job in older) * per_step
    return len(older) * left * per_token > WAIT_MARGIN * waiting


class Planner:
    def __init__(self, pool: SlotPool):
        self.pool = pool
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self, now: float) -> tuple[list[Job], list[Job]]:
        """Give slots to waiting requests, oldest first: (the requests admitted, the waiting ones
        that were cancelled or ran out of time, for the caller to finish)."""
        admitted, dropped, blocked = [], [], False
        for job in list(self.waiting):
            if job.cancelled or job.out_of_time(now):
                self.waiting.remove(job)
                dropped.append(job)
                continue
            if blocked:
                continue  # first come, first served: later requests wait behind the blocked one
            got = self.pool.acquire(job.prompt.tokens, job.n)
            if got is None:
                blocked = True
                continue
            self.waiting.remove(job)
            job.slots, job.prefilled = got
            job.admitted = time.perf_counter()
            job.timings.queue_ms = (job.admitted - job.submitted) * 1000
            job.timings.tokens_reused = job.prefilled
            self.running.append(job)
            admitted.append(job)
        return admitted, dropped

    def stopped(self, now: float) -> list[Job]:
        """Running requests that were cancelled or ran out of time."""
        return [job for job in self.running if job.cancelled or job.out_of_time(now)]

    def prefill_chunks(self, pace: tuple[Optional[float], Optional[float]] = (None, None)
                       ) -> list[list[tuple[Job, int, int]]]:
        """Groups of (job, start, end) prompt ranges to prefill this step, one group per chunk length.
        The budget goes to the oldest requests first; a prompt younger than a decoding request
        waits while waiting is cheaper (`pace`: seconds per prefilled token, per decoding step)."""
        budget, older, groups = PREFILL_CHUNK, [], {}
        for job in self.running:  # oldest first
            if job.last_logits is not None:
                older.append(job)
                continue
            left = len(job.prompt.tokens) - job.prefilled
            if budget <= 0 or (older and left > PREFILL_BEHIND_DECODE and should_wait(left, older, pace)):
                continue
            end = job.prefilled + min(left, budget)
            budget -= end - job.prefilled
            groups.setdefault(end - job.prefilled, []).append((job, job.prefilled, end))
        return list(groups.values())

    def decoding_rows(self) -> list[tuple[Job, Row]]:
        """Every live row that has a token to feed back: one decode token each this step."""
        return [(job, row) for job in self.running for row in job.live_rows() if row.tokens]

    def remove(self, job: Job) -> None:
        if job in self.running:
            self.running.remove(job)
