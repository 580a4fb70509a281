"""How far behind an engine is: the time the work already in it will take at its recent pace.

A bound on the number of waiting requests cannot keep latency down by itself: on a CPU the
requests in an engine share the model thread, so eight long prompts make each other eight
times slower, and the work in one request differs a hundredfold between a short text and a
long one. So the scheduler also refuses a request when the work ahead of it (the prompt
tokens still to prefill and the suggestion tokens still to decode, of every request running
or waiting) would take longer than WWT_MAX_WAIT_S at the rates this engine has prefilled and
decoded over the last WINDOW_S (an engine idle for longer keeps its last rates). The rates are
known from the first step on, so a burst on a cold engine is bounded too. An idle engine
accepts any request.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Iterable, Optional

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
