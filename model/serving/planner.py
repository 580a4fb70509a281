"""What runs next: which waiting requests get slots, which prompt chunks are prefilled, which rows decode.

Requests are admitted oldest first while the slot pool has room (a request that cannot get
its slots holds back the ones behind it, so none starves). Each step prefills at most
PREFILL_CHUNK prompt tokens in all, so decoding rows keep moving while a long prompt is read;
chunks of the same length are grouped so they go through the model together.
"""

from __future__ import annotations

import time
from collections import deque
from .jobs import Job, Row
from .slots import SlotPool

PREFILL_CHUNK = 256  # prompt tokens prefilled per step, in all


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

    def prefill_chunks(self) -> list[list[tuple[Job, int, int]]]:
        """Groups of (job, start, end) prompt ranges to prefill this step, one group per chunk length."""
        budget, groups = PREFILL_CHUNK, {}
        for job in self.running:
            if job.last_logits is not None or budget <= 0:
                continue
            end = min(len(job.prompt.tokens), job.prefilled + budget)
            budget -= end - job.prefilled
            groups.setdefault(end - job.prefilled, []).append((job, job.prefilled, end))
        return list(groups.values())

    def decoding_rows(self) -> list[tuple[Job, Row]]:
        """Every live row that has a token to feed back: one decode token each this step."""
        return [(job, row) for job in self.running for row in job.live_rows() if row.tokens]

    def remove(self, job: Job) -> None:
        if job in self.running:
            self.running.remove(job)
