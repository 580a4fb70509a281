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
goes on at once. The costs come from the engine's recent pace (Backlog, below); before it is
known, nothing waits. Younger requests never hold back older ones, so none starves.

The pace (Backlog, at the end of this file): how far behind an engine is, the time the work
already in it will take at its recent pace. A bound on the number of waiting requests cannot
keep latency down by itself: on a CPU the requests in an engine share the model thread, so eight
long prompts make each other eight times slower, and the work in one request differs a
hundredfold between a short text and a long one. So the scheduler also refuses a request when
the work ahead of it (the prompt tokens still to prefill and the suggestion tokens still to
decode, of every request running or waiting) would take longer than the configured max_wait_s at the rates
this engine has prefilled and decoded over the last WINDOW_S (an engine idle for longer keeps
its last rates). The rates are known from the first step on, so a burst on a cold engine is
bounded too. An idle engine accepts any request.

The planner only decides: it reads the queues, the requests and the slot pool, and returns a
plan (Admissions, StepPlan) that the scheduler applies. So each field of a request has one
writer, and a plan can be looked at before anything is changed.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from .jobs import Job, Row
from .slots import SlotPool

PREFILL_CHUNK = 256  # prompt tokens prefilled per step, in all
PREFILL_BEHIND_DECODE = 32  # a younger prompt's rest this short is prefilled beside older decoding at once
WAIT_MARGIN = 2.0  # a longer one waits only when prefilling it now costs the older requests this much more

Pace = tuple[Optional[float], Optional[float]]  # seconds per prefilled token, per decode step (Backlog, below)
Chunk = tuple[Job, int, int]  # a request and the [start, end) range of its prompt to prefill


@dataclass
class Admission:
    """A waiting request that gets slots now."""

    job: Job
    slots: list[int]  # the base slot first: it holds the prefill, the others are forked from it
    reused: int  # prompt tokens the base slot already holds


@dataclass
class Admissions:
    admit: list[Admission]  # oldest first
    drop: list[Job]  # waiting requests that were cancelled or ran out of time


@dataclass
class StepPlan:
    """What one step runs. The rows to decode are asked for after the prefill (decoding_rows),
    as a request whose prompt this step finishes decodes its first token in the same step."""

    stop: list[Job]  # running requests that were cancelled or ran out of time
    prefill: list[list[Chunk]]  # one group per chunk length, each run as one batch


def steps_left(job: Job) -> int:
    """Decode steps until a decoding request's current rows have all reached max_new_tokens."""
    return max((job.max_new_tokens - len(row.tokens) for row in job.live_rows()), default=0)


def should_wait(left: int, older: list[Job], pace: Pace) -> bool:
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
        # The queues planned over, oldest first; only the scheduler moves requests in and out.
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self, now: float) -> Admissions:
        """Which waiting requests get slots, oldest first while the pool has room (rows to run and
        KV blocks to hold them), and which waiting ones were cancelled or ran out of time."""
        plan, taken, blocked = Admissions([], []), set(), False
        budget = self.unclaimed_blocks() if self.waiting else None
        for job in self.waiting:
            if job.cancelled or job.out_of_time(now):
                plan.drop.append(job)
                continue
            if blocked:
                continue  # first come, first served: later requests wait behind the blocked one
            prompt = job.prompt.tokens
            got = self.pool.choose(prompt, job.n, taken, budget, job.max_new_tokens)
            if got is None:
                blocked = True
                continue
            taken.update(got[0])
            if budget is not None:
                budget -= self.pool.blocks_needed(len(prompt), job.max_new_tokens, job.n, got[1])
            plan.admit.append(Admission(job, *got))
        return plan

    def unclaimed_blocks(self) -> Optional[int]:
        """KV blocks the running requests will not need: the pool's blocks less what each may still
        take (None without block tables)."""
        blocks = self.pool.blocks
        if blocks is None:
            return None
        return blocks.usable - sum(self.still_needed(job) for job in self.running)

    def still_needed(self, job: Job) -> int:
        """Blocks a running request may still take: its base's prompt and suggestion past what it
        holds (one more while a prefill may copy a shared block), and each other suggestion's own
        blocks past the prompt's full ones it shares."""
        blocks = self.pool.blocks
        length = len(job.prompt.tokens)
        end = blocks.blocks_for(length + job.max_new_tokens)
        forked = {row.slot for row in job.rows}
        total = 0
        for slot in job.slots:
            if slot == job.base or slot in forked:
                total += max(0, end - len(blocks.tables[slot]))
                total += slot == job.base and job.prefilled < length
            else:
                total += end - length // blocks.block_size
        return total

    def step(self, now: float, pace: Pace = (None, None)) -> StepPlan:
        """The running requests to stop, and the prompt chunks to prefill in this step."""
        stop = [job for job in self.running if job.cancelled or job.out_of_time(now)]
        return StepPlan(stop, self.prefill_chunks(pace, skip=stop))

    def prefill_chunks(self, pace: Pace = (None, None), skip: Sequence[Job] = ()) -> list[list[Chunk]]:
        """Groups of (job, start, end) prompt ranges to prefill this step, one group per chunk length.
        The budget goes to the oldest requests first; a prompt younger than a decoding request
        waits while waiting is cheaper (`pace`). Requests in `skip` are being stopped."""
        budget, older, groups = PREFILL_CHUNK, [], {}
        for job in self.running:  # oldest first
            if job in skip:
                continue
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


# -- the pace ------------------------------------------------------------------------------

WINDOW_S = 30.0  # how much recent work the rates are measured over


class _Rate:
    """An amount (tokens, or seconds) per second of the model thread's time, over the last WINDOW_S."""

    def __init__(self, clock):
        self._clock = clock
        self._samples: deque[tuple[float, int, float]] = deque()  # (when, tokens, seconds)
        self._tokens, self._seconds = 0, 0.0
        self.total_seconds = 0.0  # ever added
        self._last: Optional[float] = None  # the rate when work was last seen: an idle engine keeps its pace

    def add(self, tokens: float, seconds: float) -> None:
        self.total_seconds += seconds
        self._samples.append((self._clock(), tokens, seconds))
        self._tokens += tokens
        self._seconds += seconds

    def per_second(self) -> Optional[float]:
        horizon = self._clock() - WINDOW_S
        while self._samples and self._samples[0][0] < horizon:
            _, tokens, seconds = self._samples.popleft()
            self._tokens -= tokens
            self._seconds -= seconds
        if self._samples and self._seconds > 0 and self._tokens > 0:
            self._last = self._tokens / self._seconds
        return self._last


class Backlog:
    def __init__(self, clock=time.monotonic):
        self.prefill = _Rate(clock)  # prompt tokens per second of prefill
        self.decode = _Rate(clock)   # suggestion tokens (all rows together) per second of decoding
        self.turns = _Rate(clock)    # seconds of whole turns per second of prefill and decode in them
        self.decode_steps = _Rate(clock)  # steps that only decoded, per second of them (all of the step)

    def counted_seconds(self) -> float:
        """Seconds of prefill and decode ever timed (turn() takes the difference over a turn)."""
        return self.prefill.total_seconds + self.decode.total_seconds

    def turn(self, seconds: float, counted: float) -> None:
        """A turn of the model thread took `seconds`, of which `counted` went to prefill and decode
        (the rest, forks, sampling and bookkeeping, is spread over the rates in expected_wait)."""
        if counted > 0:
            self.turns.add(seconds, counted)

    def pace(self) -> tuple[Optional[float], Optional[float]]:
        """(seconds a prompt token takes to prefill, seconds a step that only decodes takes, with
        its sampling and bookkeeping) at the recent rates; None for one not known yet. The planner
        weighs prefilling a prompt now against making it wait for decoding requests with them."""
        prefill_rate, step_rate = self.prefill.per_second(), self.decode_steps.per_second()
        return (1 / prefill_rate if prefill_rate else None), (1 / step_rate if step_rate else None)

    def expected_wait(self, jobs: Iterable) -> Optional[float]:
        """Seconds the work left in `jobs` (running or waiting) takes at the recent rates; None while
        no rate is known (nothing has run yet)."""
        prefill_rate, decode_rate = self.prefill.per_second(), self.decode.per_second()
        if prefill_rate is None and decode_rate is None:
            return None
        to_prefill = to_decode = 0
        for job in jobs:
            to_prefill += max(0, len(job.prompt.tokens) - job.prefilled)
            to_decode += job.n * job.max_new_tokens - sum(len(row.tokens) for row in job.rows)
        wait = 0.0
        if prefill_rate is not None:
            wait += to_prefill / prefill_rate
        if decode_rate is not None:
            wait += max(0, to_decode) / decode_rate
        return wait * max(1.0, self.turns.per_second() or 1.0)
