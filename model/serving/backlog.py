"""How far behind an engine is: the wait a new request can expect, from the engine's own recent pace.

A bound on the number of waiting requests cannot keep latency down by itself: on a CPU, long
prompts share the model thread, so eight running requests each take eight times as long, and
how many requests fit in a few seconds changes a hundredfold between a short and a long text.
So the scheduler also refuses a request when the requests already in the engine (running and
waiting) would take longer than WWT_MAX_WAIT_S at the rate the engine has been finishing
requests per second of model work over the last WINDOW_S. Until a few requests have finished
in the window there is no estimate and nothing is refused on this ground.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Optional

WINDOW_S = 30.0  # how much recent work the pace is measured over
MIN_FINISHED = 4  # finished requests in the window before the pace is trusted


class Backlog:
    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._work: deque[tuple[float, float]] = deque()  # (when, seconds the model thread worked)
        self._finished: deque[float] = deque()             # when each request finished
        self._work_s = 0.0

    def worked(self, seconds: float) -> None:
        """The model thread spent `seconds` on a step of this engine."""
        self._work.append((self._clock(), seconds))
        self._work_s += seconds

    def finished(self) -> None:
        self._finished.append(self._clock())

    def _forget_old(self) -> None:
        horizon = self._clock() - WINDOW_S
        while self._work and self._work[0][0] < horizon:
            self._work_s -= self._work.popleft()[1]
        while self._finished and self._finished[0] < horizon:
            self._finished.popleft()

    def expected_wait(self, in_engine: int) -> Optional[float]:
        """Seconds until `in_engine` requests are done at the recent pace; None while it is unknown."""
        self._forget_old()
        if len(self._finished) < MIN_FINISHED or self._work_s <= 0:
            return None
        per_second = len(self._finished) / self._work_s
        return in_engine / per_second
