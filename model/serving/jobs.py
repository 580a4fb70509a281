"""A completion request on its way through the scheduler: its rows, its handle, and calls.

`Job` is the request's state (prompt, slots, rows being generated, accepted suggestions);
`Progress` hands its suggestions, as they are written, from the model thread to a reader;
`Handle` is what a caller holds; `Call` runs a function on the model thread between steps.

Each field has one writer: the scheduler (scheduler.py) a job's slots, prefill progress, rows,
timings and outcome; the row policy (row_policy.py) what a row generates and the suggestions
kept; the handle the cancellation mark. The planner only reads.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import RequestTimeout, WWTError
from ..streaming import GrowOnly
from ..types import PartialSuggestion, Suggestion, Timings
from .autocomplete import Prompt, settled_text
from .sampling import SamplingSettings


class Progress:
    """A request's suggestions while they are written, handed from the model thread to a reader.

    The model thread publishes a snapshot after each step that changed a watched job, and when
    the job ends; a reader blocks on the job's own condition until then, so a partial reaches
    it as soon as its step is done, with no polling and without touching the scheduler's lock.
    A reader slower than the steps sees only the newest snapshot (they coalesce; nothing queues).
    Jobs nobody watches cost one flag test per step."""

    def __init__(self):
        self._cond = threading.Condition()
        self.watched = False
        self._version = 0
        self._snapshot: tuple = ()
        self._closed = False
        self._grow = GrowOnly()

    def publish(self, snapshot: tuple) -> None:
        """(model thread) Make `snapshot` the newest, waking the reader if it differs."""
        with self._cond:
            snapshot = tuple(self._grow.apply(snapshot))
            if snapshot != self._snapshot:
                self._snapshot = snapshot
                self._version += 1
                self._cond.notify_all()

    def close(self) -> None:
        """(model thread) The job has ended: no snapshot follows."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait(self, seen: int, timeout: Optional[float]) -> tuple[int, tuple, bool]:
        """Block until a snapshot newer than version `seen`, the end, or `timeout`:
        (version, snapshot, closed)."""
        with self._cond:
            self._cond.wait_for(lambda: self._version != seen or self._closed, timeout)
            return self._version, self._snapshot, self._closed


def snapshot(job) -> tuple:
    """The job's suggestions now, by row index; rows already dropped (duplicate or empty) are left out.

    An unfinished row shows only its settled text (autocomplete.settled_text), so what a reader
    is shown is not taken back by a stop rule later. A row's text is complete UTF-8 characters
    only (autocomplete.continuation), so no snapshot ends inside a character.
    """
    out = []
    for row in sorted(job.rows, key=lambda r: r.index):
        if row.kept is False:
            continue
        finished = row.finish is not None
        text = row.text if finished else settled_text(row.text, job.stop)
        partial = PartialSuggestion(index=row.index, text=text, finished=finished, finish_reason=row.finish)
        if job.top_logprobs is not None:
            partial.token_ids, partial.logprobs = list(row.tokens), list(row.logprobs)
            partial.tokens, partial.top_logprobs = list(row.pieces), list(row.top)
        out.append(partial)
    return tuple(out)


@dataclass
class Row:
    """One continuation being generated in one cache slot."""

    index: int  # which seed / rank this row uses
    slot: int
    generator: Optional[torch.Generator]
    pending: bytes  # healed characters still to spell out
    tokens: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    text: str = ""
    finish: Optional[str] = None
    pieces: list = field(default_factory=list)  # raw mode: each token's share of the text (raw_text.py)
    writer: Optional[object] = None  # raw mode: the raw_text.PieceWriter that writes `pieces`
    top: list = field(default_factory=list)  # with top_logprobs: each step's likeliest tokens [[id, logprob]]
    kept_tokens: Optional[int] = None  # raw mode, a stop string cut the text: the tokens that start in it
    kept: Optional[bool] = None  # None until the finished row is collected; then whether it became a suggestion


class Job:
    """A completion request on its way through the scheduler."""

    def __init__(self, prompt: Prompt, n: int, max_new_tokens: int, settings: SamplingSettings,
                 seed: Optional[int], max_time: Optional[float], stop, eos: Optional[int],
                 raw: bool = False, top_logprobs: Optional[int] = None):
        self.prompt = prompt
        self.raw = raw  # the OpenAI-compatible mode: exactly n rows, in order, kept as they are
        self.top_logprobs = top_logprobs  # None: no per-token details; else this many alternatives
        self.n = n
        self.max_new_tokens = max_new_tokens
        self.settings = settings
        self.seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
        self.stop = stop
        self.eos = eos
        self.submitted = time.perf_counter()
        # max_time runs from submission: time spent waiting for slots counts toward it.
        self.deadline = None if max_time is None else self.submitted + max_time
        self.slots: list[int] = []
        self.prefilled = 0  # prompt tokens whose keys/values are in the base slot
        self.last_logits: Optional[torch.Tensor] = None
        self.rows: list[Row] = []
        self.rounds = 0
        self.accepted: list[Suggestion] = []
        self.seen_texts: set[str] = set()
        self.cancelled = False
        self.client: Optional[str] = None  # who asked (Scheduler.submit), for the per-client bound
        self.timings = Timings()
        self.decode_started = 0.0
        self.done = threading.Event()
        self.progress = Progress()  # snapshots for a streaming reader (Progress, above)
        self.result: Optional[list[Suggestion]] = None
        self.error: Optional[WWTError] = None

    @property
    def base(self) -> int:
        return self.slots[0]

    def out_of_time(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def new_row(self, slot: int) -> Row:
        """The next row of this request, in `slot`: row i samples with seed + i."""
        index = len(self.rows)
        generator = None if self.settings.greedy else torch.Generator().manual_seed(self.seed + index)
        return Row(index=index, slot=slot, generator=generator, pending=self.prompt.heal)

    def live_rows(self) -> list[Row]:
        return [r for r in self.rows if r.finish is None]


class Handle:
    """What `submit` returns: wait for the result, or cancel."""

    def __init__(self, job: Job, wake):
        self._job = job
        self._wake = wake

    @property
    def job(self) -> Job:
        return self._job

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Whether the request finished within `timeout` (it keeps running if not): a worker waits in
        short slices and looks for a cancellation mark between them."""
        return self._job.done.wait(timeout)

    def result(self, timeout: Optional[float] = None) -> tuple[list[Suggestion], Timings]:
        if not self._job.done.wait(timeout):
            self.cancel()
            raise RequestTimeout(f"no answer within {timeout:g} s")
        if self._job.error is not None:
            raise self._job.error
        return self._job.result, self._job.timings

    def updates(self, timeout: Optional[float] = None, tick: Optional[float] = None):
        """The request's suggestions as they are written: yields a tuple of PartialSuggestion after
        each step that changed them (the newest only, if the reader is slower than the steps),
        and returns when the request has ended (then `result` gives the answer).

        With `tick`, also yields None when that long passed without a change, so the reader can
        look at something else (the worker checks for a cancellation mark). Past `timeout` the
        request is cancelled and RequestTimeout raised, as `result` does.
        """
        progress = self._job.progress
        progress.watched = True
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = 0
        while True:
            wait = tick
            if deadline is not None:
                left = max(0.0, deadline - time.monotonic())
                wait = left if wait is None else min(wait, left)
            version, snapshot, closed = progress.wait(seen, wait)
            if version != seen:
                seen = version
                yield snapshot
            elif closed:
                return
            elif deadline is not None and time.monotonic() >= deadline:
                self.cancel()
                raise RequestTimeout(f"no answer within {timeout:g} s")
            elif tick is not None:
                yield None

    def cancel(self) -> None:
        self._job.cancelled = True
        self._wake()

    def done(self) -> bool:
        return self._job.done.is_set()


class Call:
    """A function to run on the scheduler's thread between steps (see threads.py for why)."""

    def __init__(self, fn):
        self.fn = fn
        self.done = threading.Event()
        self.result = None
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except Exception as e:  # the caller re-raises it
            self.error = e
        self.done.set()
