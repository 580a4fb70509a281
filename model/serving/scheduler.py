"""Continuous batching over the static KV cache: the loop that ties the parts together.

The model thread (threads.py) gives the scheduler turns. Each turn runs the calls waiting for
the model thread, admits requests and takes one step: the planner (planner.py) decides what runs
and the scheduler applies its plans, the runner (runner.py) runs the network on them, the row
policy (row_policy.py) picks tokens and decides when rows and requests are done, and the slot
pool (slots.py) records what each slot holds. The scheduler alone writes a request's slots,
prefill progress, rows and timings, and its own counters. A request that arrives mid-way joins
at the next step; a cancelled or timed-out request frees its slots at the next step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Optional

import torch

from ..errors import BadRequest, Busy, Cancelled, WWTError
from ..network.gpt import GPTWithHead
from ..network.tokenizer import GPTTokenizer
from .decode_graph import FixedShapeDecoder
from .jobs import Call, Handle, Job, Row, snapshot
from .kv_cache import KVCache
from .planner import Admissions, Backlog, Chunk, Planner
from .row_policy import RowPolicy
from .runner import ModelRunner
from .slots import SlotPool
from .threads import model_thread

log = logging.getLogger(__name__)

EXTRA_ROUNDS = 2  # rounds of replacement rows for empty or duplicate suggestions


class Scheduler:
    def __init__(self, model: GPTWithHead, tokenizer: GPTTokenizer, cache: KVCache,
                 fixed_shape: Optional[FixedShapeDecoder] = None, name: str = "this model", *,
                 rows: Optional[int] = None, eviction: str = "next-use",
                 max_waiting: Optional[int] = None, max_waiting_per_client: Optional[int] = None,
                 max_wait_s: Optional[float] = None):
        self.name = name
        # Admission bounds (EngineConfig); None or 0: no bound. Only requests still waiting for
        # slots count, not running ones. max_wait_s: refuse when the engine is this far behind (planner.py's Backlog).
        self.max_waiting = max_waiting or None
        self.max_waiting_per_client = max_waiting_per_client or None
        self.max_wait_s = max_wait_s or None
        self.backlog = Backlog()
        # rows: suggestions decoding at once (the busy slots); the KV pool's blocks bound the rest
        self.pool = SlotPool(cache.blocks.handles, blocks=cache.blocks, rows=rows, eviction=eviction)
        self.planner = Planner(self.pool)
        self.runner = ModelRunner(model, cache, fixed_shape)
        self.policy = RowPolicy(tokenizer, model.config.vocab_size, max_length=cache.context)
        self.counters = {"tokens_prefilled": 0, "tokens_reused": 0, "tokens_decoded": 0, "requests": 0,
                         "steps": 0, "max_batch": 0}
        self._calls: deque[Call] = deque()
        self._closed = False
        self._gone = threading.Event()
        self._worker = model_thread(self.runner.device)
        self._cond = self._worker.cond  # one lock for the thread and all its schedulers
        self._worker.add(self)

    # -- the callers' side ---------------------------------------------------------------
    def submit(self, job: Job, client: Optional[str] = None) -> Handle:
        """Queue `job`; Busy (at once, nothing queued) past the waiting bounds. `client` is who
        asked (an IP address, an editor id): one client may hold at most max_waiting_per_client
        of the waiting places."""
        self._check_fits(job)
        with self._cond:
            if self._closed:
                raise Cancelled("the engine is shut down")
            self._admit_or_refuse(client)
            job.client = client
            self.planner.waiting.append(job)
            self.counters["requests"] += 1
            self._cond.notify_all()
        return Handle(job, self._wake)

    def cache_stats(self) -> dict:
        """What the KV cache holds now: rows, positions used and free, documents held, evictions."""
        with self._cond:
            blocks, pool = self.pool.blocks, self.pool
            return {"rows": pool.rows, "block_size": blocks.block_size, "kv_tokens": blocks.usable * blocks.block_size,
                    "kv_tokens_used": blocks.used_blocks() * blocks.block_size,
                    "kv_tokens_free": blocks.free_blocks() * blocks.block_size,
                    "kv_documents": pool.documents(), "evictions": pool.evictions, "eviction": pool.policy.name}

    def _check_fits(self, job: Job) -> None:
        """A request that could never run, not even alone on an empty cache, is refused at once."""
        blocks = self.pool.blocks
        need = self.pool.blocks_needed(len(job.prompt.tokens), job.max_new_tokens, job.n, 0)
        if need > blocks.usable:
            raise BadRequest(f"this request needs {need * blocks.block_size} KV-cache positions and {self.name} "
                             f"holds {blocks.usable * blocks.block_size}; ask for fewer suggestions or a shorter text")

    def waiting(self) -> int:
        """Requests waiting for slots (not counting cancelled or timed-out ones not yet swept)."""
        with self._cond:
            return len(self._live_waiting(time.perf_counter()))

    def _live_waiting(self, now: float) -> list[Job]:
        return [j for j in self.planner.waiting if not j.cancelled and not j.out_of_time(now)]

    def _admit_or_refuse(self, client: Optional[str]) -> None:
        """(under the lock) Raise Busy when the waiting list, or this client's share of it, is full."""
        bound, per_client = self.max_waiting, self.max_waiting_per_client
        if not bound and not (per_client and client is not None) and not self.max_wait_s:
            return
        live = self._live_waiting(time.perf_counter())
        if self.max_wait_s:
            # a cancelled request (say, the keystroke this one supersedes) leaves at the next step
            behind = self.backlog.expected_wait(live + [j for j in self.planner.running if not j.cancelled])
            if behind is not None and behind > self.max_wait_s:
                amount = f"{behind:.1f}" if behind < 10 else f"{behind:.0f}"  # never "about 0 s"
                raise Busy(f"busy: {self.name} is about {amount} s behind; try again in a moment")
        if bound and len(live) >= bound:
            are = "request is" if len(live) == 1 else "requests are"
            raise Busy(f"busy: {len(live)} {are} waiting for {self.name}; try again in a moment")
        if per_client and client is not None:
            mine = sum(1 for j in live if j.client == client)
            if mine >= per_client:
                    raise Busy(f"busy: {mine} of your requests are already waiting for {self.name}; "
                           f"try again in a moment")

    def call(self, fn):
        """Run fn() on the model thread between two steps; return its result or raise its error.

        All model work of an engine goes through here or the steps, so the process keeps one
        OpenMP thread pool however many threads call the engine (see threads.py).
        """
        if self.on_model_thread():
            return fn()
        call = Call(fn)
        with self._cond:
            if self._closed:
                raise Cancelled("the engine is shut down")
            self._calls.append(call)
            self._cond.notify_all()
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def on_model_thread(self) -> bool:
        return threading.current_thread() is self._worker.thread

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if not self.on_model_thread() and self._worker.thread.is_alive():
            self._gone.wait(timeout=10)

    # -- the model thread's side ---------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self._closed or self.planner.has_work() or self._calls)

    def turn(self) -> None:
        """Run waiting calls, admit waiting requests and take one batching step."""
        started, counted = time.perf_counter(), self.backlog.counted_seconds()  # the backlog's overhead factor
        with self._cond:
            if self._closed:
                self._shut_down()
                return
            calls, self._calls = list(self._calls), deque()
            admitted = self._admit(self.planner.admit(time.perf_counter()))
        self._copy_prefixes(admitted)
        for call in calls:
            call.run()
        if not self.planner.running:
            return
        step_started, prefilled = time.perf_counter(), self.counters["tokens_prefilled"]
        try:
            with torch.inference_mode():
                self._step()
            if self.counters["tokens_prefilled"] == prefilled:  # a step of decoding only: the planner's pace
                self.backlog.decode_steps.add(1, time.perf_counter() - step_started)
        except Exception as e:  # a bug must fail the requests, never kill the loop
            log.exception("scheduler step failed")
            for job in list(self.planner.running):
                self._finish(job, error=WWTError(f"internal error while generating: {e.__class__.__name__}"))
        self.backlog.turn(time.perf_counter() - started, self.backlog.counted_seconds() - counted)

    def _admit(self, plan: Admissions) -> list[Job]:
        """(under the lock) Apply the planner's admissions: finish the dropped requests, give the
        admitted ones their slots and make them run. Returns the admitted requests."""
        for job in plan.drop:
            self.planner.waiting.remove(job)
            self._finish(job, error=Cancelled("the request was cancelled") if job.cancelled else None)
        now = time.perf_counter()
        for a in plan.admit:
            self.planner.waiting.remove(a.job)
            self.pool.reserve(a.slots, a.reused, a.job.prompt.tokens)
            a.job.slots, a.job.prefilled = a.slots, a.reused
            a.job.timings.queue_ms = (now - a.job.submitted) * 1000
            self.planner.running.append(a.job)
        return [a.job for a in plan.admit]

    def _copy_prefixes(self, admitted: list[Job]) -> None:
        """Copy into each new request's base slot the prefix another slot holds (a running request
        of the same document), before any step can write over it; count the tokens reused."""
        for job in admitted:
            donor = self.pool.donor(job.prompt.tokens, job.base)
            if donor is not None:
                src, upto = donor
                try:
                    with torch.inference_mode():
                        self.runner.fork(src, job.base, upto)
                except Exception:  # then the prompt is prefilled as if no slot held it
                    log.exception("copying a prefix between slots failed")
                else:
                    self.pool.wrote(job.base, job.prompt.tokens[:upto])
                    job.prefilled = upto
            job.timings.tokens_reused = job.prefilled
            self.counters["tokens_reused"] += job.prefilled

    def _shut_down(self) -> None:
        for job in list(self.planner.waiting) + self.planner.running:
            self._finish(job, error=Cancelled("the engine is shut down"))
        self.planner.waiting.clear()
        for call in self._calls:
            call.error = Cancelled("the engine is shut down")
            call.done.set()
        self._calls.clear()
        self._worker.remove(self)
        self._gone.set()

    def _step(self) -> None:
        plan = self.planner.step(time.perf_counter(), self.backlog.pace())
        for job in plan.stop:
            reason = "cancelled" if job.cancelled else "time"
            for row in job.live_rows():
                self.policy.end(job, row, reason)
            if job.cancelled:
                self._finish(job, error=Cancelled("the request was cancelled"))
            else:
                self._complete_round(job)
        for job in self._prefill(plan.prefill):  # first tokens: a streaming reader sees them before the decode
            if job.progress.watched and not job.done.is_set():
                job.progress.publish(snapshot(job))
        self._decode(self.planner.decoding_rows())
        self.counters["steps"] += 1
        for job in self.planner.running:  # streaming readers see the step's tokens now (jobs.Progress)
            if job.progress.watched:
                job.progress.publish(snapshot(job))

    def _prefill(self, groups: list[list[Chunk]]) -> list[Job]:
        """Run the prompt chunks; the jobs whose prompts are now whole have their first tokens."""
        started = []
        for group in groups:
            t0 = time.perf_counter()
            done = [b for b, (job, _, end) in enumerate(group) if end == len(job.prompt.tokens)]
            logits = self.runner.prefill([job.prompt.tokens[start:end] for job, start, end in group],
                                         [start for _, start, _ in group], [job.base for job, _, _ in group], done)
            elapsed_ms = (time.perf_counter() - t0) * 1000
            self.backlog.prefill.add(sum(end - start for _, start, end in group), elapsed_ms / 1000)
            for job, start, end in group:
                self.counters["tokens_prefilled"] += end - start
                job.timings.tokens_prefilled += end - start
                job.timings.prefill_ms += elapsed_ms
                job.prefilled = end
                self.pool.wrote(job.base, job.prompt.tokens[:end])
            for i, b in enumerate(done):
                job = group[b][0]
                job.last_logits = logits[i]
                job.decode_started = time.perf_counter()
                self._start_rows(job, job.n)
                started.append(job)
                if not job.live_rows():
                    self._complete_round(job)
        return started

    def _start_rows(self, job: Job, count: int) -> None:
        """Fork `count` new rows from the prefilled prompt and pick their first tokens."""
        prompt = job.prompt.tokens
        busy = {r.slot for r in job.live_rows()}
        free = [s for s in job.slots if s not in busy]
        for slot in free[:count]:
            if slot != job.base:
                self.runner.fork(job.base, slot, len(prompt), suggestion=True)
            self.pool.wrote(slot, prompt)
            job.rows.append(job.new_row(slot))
        started = job.rows[-count:]
        if started:
            self.policy.take([(job, row) for row in started], job.last_logits.expand(len(started), -1))

    def _decode(self, rows: list[tuple[Job, Row]]) -> None:
        if not rows:
            return
        t0 = time.perf_counter()
        logits = self.runner.decode([row.slot for _, row in rows], [row.tokens[-1] for _, row in rows],
                                    [len(job.prompt.tokens) + len(row.tokens) - 1 for job, row in rows],
                                    shared=self._shared_prompts(rows))
        self.counters["tokens_decoded"] += len(rows)
        self.counters["max_batch"] = max(self.counters["max_batch"], len(rows))
        for job, row in rows:
            self.pool.appended(row.slot, row.tokens[-1])
            job.timings.tokens_decoded += 1
        self.policy.take(rows, logits)
        self.backlog.decode.add(len(rows), time.perf_counter() - t0)
        for job in {job for job, _ in rows}:
            if not job.live_rows():
                self._complete_round(job)

    @staticmethod
    def _shared_prompts(rows: list[tuple[Job, Row]]) -> list[tuple[list[int], int]]:
        """The rows of each request, with its prompt length: their slots all hold that prompt."""
        by_job: dict[int, list[int]] = {}
        for b, (job, _) in enumerate(rows):
            by_job.setdefault(id(job), []).append(b)
        return [(group, len(rows[group[0]][0].prompt.tokens)) for group in by_job.values() if len(group) > 1]

    def _complete_round(self, job: Job) -> None:
        """Keep the distinct, non-empty suggestions; start replacements while there is time."""
        if job.done.is_set() or job.live_rows():
            return
        missing = self.policy.collect(job)
        if missing and job.rounds < EXTRA_ROUNDS and not job.cancelled and not job.out_of_time(time.perf_counter()):
            job.rounds += 1
            self._start_rows(job, missing)
            if not job.live_rows():
                self._complete_round(job)
            return
        self._finish(job)

    def _finish(self, job: Job, error: Optional[WWTError] = None) -> None:
        if job.done.is_set():
            return
        now = time.perf_counter()
        if job in self.planner.running:
            self.planner.running.remove(job)
        if job.slots:  # the base slot stays usable as the document's prefix; the copies become spares
            self.pool.release(job.slots, keep=job.base)
        if job.decode_started:
            job.timings.decode_ms = (now - job.decode_started) * 1000
        job.timings.total_ms = (now - job.submitted) * 1000
        if error is None and job.cancelled:
            error = Cancelled("the request was cancelled")
        job.error = error
        job.result = list(job.accepted)
        if job.progress.watched:
            job.progress.publish(snapshot(job))
        job.done.set()
        job.progress.close()
        with self._cond:
            self._cond.notify_all()
