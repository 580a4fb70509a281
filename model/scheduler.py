"""Continuous batching over the static KV cache.

The model thread (threads.py) owns the cache: each turn it runs the calls that wait for
it, then takes one step, which prefills a bounded chunk of the waiting prompts and decodes one token for every live row of every running request in a
single forward pass. A request that arrives mid-way joins at the next step; a long
request never holds a short one back; a cancelled or timed-out request frees its slots
at the next step.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch

from .autocomplete import HealingMasks, Prompt, apply_stop, continuation
from .decode_graph import FixedShapeDecoder
from .errors import Cancelled, RequestTimeout, WWTError
from .gpt import GPTModel, KVCache
from .sampling import SamplingSettings, apply_repetition_penalty, sample_rows
from .slots import SlotPool, common_prefix
from .threads import model_thread
from .tokenizer import GPTTokenizer
from .types import Suggestion, Timings

log = logging.getLogger(__name__)

PREFILL_CHUNK = 256  # prompt tokens prefilled per step, so decoding rows keep moving
EXTRA_ROUNDS = 2  # rounds of replacement rows for empty or duplicate suggestions


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
    collected: bool = False  # looked at by the job's round of distinct suggestions


class Job:
    """A completion request on its way through the scheduler."""

    def __init__(self, prompt: Prompt, n: int, max_new_tokens: int, settings: SamplingSettings,
                 seed: Optional[int], max_time: Optional[float], stop, eos: Optional[int]):
        self.prompt = prompt
        self.n = n
        self.max_new_tokens = max_new_tokens
        self.settings = settings
        self.seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
        self.stop = stop
        self.eos = eos
        self.submitted = time.perf_counter()
        self.deadline = None if max_time is None else self.submitted + max_time
        self.slots: list[int] = []
        self.prefilled = 0  # prompt tokens whose keys/values are in the base slot
        self.last_logits: Optional[torch.Tensor] = None
        self.rows: list[Row] = []
        self.next_index = 0
        self.rounds = 0
        self.accepted: list[Suggestion] = []
        self.seen_texts: set[str] = set()
        self.cancelled = False
        self.timings = Timings()
        self.admitted = 0.0
        self.decode_started = 0.0
        self.done = threading.Event()
        self.result: Optional[list[Suggestion]] = None
        self.error: Optional[WWTError] = None

    @property
    def base(self) -> int:
        return self.slots[0]

    def out_of_time(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

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
        """Whether the request finished within `timeout` (it keeps running if not)."""
        return self._job.done.wait(timeout)

    def result(self, timeout: Optional[float] = None) -> tuple[list[Suggestion], Timings]:
        if not self._job.done.wait(timeout):
            self.cancel()
            raise RequestTimeout(f"no answer within {timeout:g} s")
        if self._job.error is not None:
            raise self._job.error
        return self._job.result, self._job.timings

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


class Scheduler:
    def __init__(self, model: GPTModel, tokenizer: GPTTokenizer, cache: KVCache,
                 fixed_shape: Optional[FixedShapeDecoder] = None):
        self.model = model
        self.fixed_shape = fixed_shape
        # The last position is where idle slots park in a fixed-shape step: never a real token.
        self.max_length = cache.context - 1
        self.tokenizer = tokenizer
        self.cache = cache
        self.pool = SlotPool(cache.slots)
        self.device = model.transformer.wte.weight.device
        self.healing = HealingMasks(tokenizer, model.config.vocab_size) if tokenizer.byte_level else None
        self.counters = {"tokens_prefilled": 0, "tokens_reused": 0, "tokens_decoded": 0, "requests": 0,
                         "steps": 0, "max_batch": 0}
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._calls: deque[Call] = deque()
        self._closed = False
        self._gone = threading.Event()
        self._worker = model_thread(self.device)
        self._cond = self._worker.cond  # one lock for the thread and all its schedulers
        self._thread = self._worker.thread
        self._worker.add(self)

    # -- the callers' side ---------------------------------------------------------------
    def submit(self, job: Job) -> Handle:
        with self._cond:
            if self._closed:
                raise Cancelled("the engine is shut down")
            self._waiting.append(job)
            self.counters["requests"] += 1
            self._cond.notify_all()
        return Handle(job, self._wake)

    def call(self, fn):
        """Run fn() on the model thread between two steps; return its result or raise its error.

        All model work of an engine goes through here or the steps, so the process keeps one
        OpenMP thread pool however many threads call the engine (see threads.py).
        """
        if threading.current_thread() is self._thread:
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

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._gone.wait(timeout=10)

    # -- the model thread's side ---------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self._closed or self._waiting or self._running or self._calls)

    def turn(self) -> None:
        """Run waiting calls, admit waiting requests and take one batching step."""
        with self._cond:
            if self._closed:
                for job in list(self._waiting) + self._running:
                    self._finish(job, error=Cancelled("the engine is shut down"))
                for call in self._calls:
                    call.error = Cancelled("the engine is shut down")
                    call.done.set()
                self._calls.clear()
                self._worker.remove(self)
                self._gone.set()
                return
            calls, self._calls = list(self._calls), deque()
            self._admit()
        for call in calls:
            call.run()
        if not self._running:
            return
        try:
            with torch.inference_mode():
                self._step()
        except Exception as e:  # a bug must fail the requests, never kill the loop
            log.exception("scheduler step failed")
            for job in list(self._running):
                self._finish(job, error=WWTError(f"internal error while generating: {e.__class__.__name__}"))

    def _admit(self) -> None:
        """Give slots to waiting requests, oldest first; drop the cancelled ones (wherever they wait)."""
        blocked = False
        for job in list(self._waiting):
            if job.cancelled or job.out_of_time(time.perf_counter()):
                self._waiting.remove(job)
                self._finish(job, error=Cancelled("the request was cancelled") if job.cancelled else None)
                continue
            if blocked:
                continue  # first come, first served: later requests wait behind the blocked one
            got = self.pool.acquire(job.prompt.tokens, job.n)
            if got is None:
                blocked = True
                continue
            self._waiting.remove(job)
            job.slots, job.prefilled = got
            job.admitted = time.perf_counter()
            job.timings.queue_ms = (job.admitted - job.submitted) * 1000
            job.timings.tokens_reused = job.prefilled
            self.counters["tokens_reused"] += job.prefilled
            self._running.append(job)

    def _step(self) -> None:
        now = time.perf_counter()
        for job in list(self._running):
            if job.cancelled or job.out_of_time(now):
                reason = "cancelled" if job.cancelled else "time"
                for row in job.live_rows():
                    self._end_row(job, row, reason)
                if job.cancelled:
                    self._finish(job, error=Cancelled("the request was cancelled"))
                else:
                    self._complete_round(job)
        self._prefill_some()
        self._decode_one()
        self.counters["steps"] += 1

    def _prefill_some(self) -> None:
        """Prefill the next chunks of the prompts still to prefill, PREFILL_CHUNK tokens a step in all.

        Chunks of the same length go through the model together, so requests that arrive at
        once read the weights once between them.
        """
        budget, groups = PREFILL_CHUNK, {}
        for job in self._running:
            if job.last_logits is not None or budget <= 0:
                continue
            end = min(len(job.prompt.tokens), job.prefilled + budget)
            budget -= end - job.prefilled
            groups.setdefault(end - job.prefilled, []).append((job, job.prefilled, end))
        for group in groups.values():
            t0 = time.perf_counter()
            ids = torch.tensor([job.prompt.tokens[start:end] for job, start, end in group], device=self.device)
            pos = torch.tensor([list(range(start, end)) for _, start, end in group], device=self.device)
            hidden = self.model.transformer(ids, cache=self.cache, slots=[job.base for job, _, _ in group],
                                            positions=pos)
            done = [b for b, (job, _, end) in enumerate(group) if end == len(job.prompt.tokens)]
            logits = self.model.lm_head(hidden[done, -1]).float().cpu() if done else None
            elapsed_ms = (time.perf_counter() - t0) * 1000
            for job, start, end in group:
                self.counters["tokens_prefilled"] += end - start
                job.timings.tokens_prefilled += end - start
                job.timings.prefill_ms += elapsed_ms
                job.prefilled = end
                self.pool.tokens[job.base] = list(job.prompt.tokens[:end])
            for i, b in enumerate(done):
                job = group[b][0]
                job.last_logits = logits[i]
                job.decode_started = time.perf_counter()
                self._start_rows(job, job.n)
                if not job.live_rows():
                    self._complete_round(job)

    def _start_rows(self, job: Job, count: int) -> None:
        """Fork `count` new rows from the prefilled prompt and pick their first tokens."""
        prompt = job.prompt.tokens
        busy = {r.slot for r in job.live_rows()}
        free = [s for s in job.slots if s not in busy]
        for slot in free[:count]:
            held = common_prefix(self.pool.tokens[slot], prompt)
            if slot != job.base:
                self.cache.copy_slot(job.base, slot, len(prompt), start=held)
            self.pool.tokens[slot] = list(prompt)
            index = job.next_index
            job.next_index += 1
            gen = None
            if not job.settings.greedy:
                gen = torch.Generator().manual_seed(job.seed + index)
            job.rows.append(Row(index=index, slot=slot, generator=gen, pending=job.prompt.heal))
        started = job.rows[-count:]
        if started:
            self._take([(job, row) for row in started], job.last_logits.expand(len(started), -1))

    def _decode_one(self) -> None:
        rows = [(job, row) for job in self._running for row in job.live_rows() if row.tokens]
        if not rows:
            return
        tokens = [row.tokens[-1] for _, row in rows]
        positions = [len(job.prompt.tokens) + len(row.tokens) - 1 for job, row in rows]
        slots = [row.slot for _, row in rows]
        if self.fixed_shape is not None:
            logits = self.fixed_shape.step(slots, tokens, positions).float().cpu()
        else:
            ids = torch.tensor([[t] for t in tokens], device=self.device)
            pos = torch.tensor([[p] for p in positions], device=self.device)
            hidden = self.model.transformer(ids, cache=self.cache, slots=slots, positions=pos,
                                            shared=self._shared_prompts(rows))
            logits = self.model.lm_head(hidden[:, -1]).float().cpu()
        self.counters["tokens_decoded"] += len(rows)
        self.counters["max_batch"] = max(self.counters["max_batch"], len(rows))
        for job, row in rows:
            self.pool.tokens[row.slot].append(row.tokens[-1])
            job.timings.tokens_decoded += 1
        self._take(rows, logits)
        for job in {job for job, _ in rows}:
            if not job.live_rows():
                self._complete_round(job)

    @staticmethod
    def _shared_prompts(rows: list) -> list[tuple[list[int], int]]:
        """The rows of each request, with its prompt length: their slots all hold that prompt."""
        by_job: dict[int, list[int]] = {}
        for b, (job, _) in enumerate(rows):
            by_job.setdefault(id(job), []).append(b)
        return [(group, len(rows[group[0]][0].prompt.tokens)) for group in by_job.values() if len(group) > 1]

    def _take(self, rows: list, logits: torch.Tensor) -> None:
        """Choose each row's next token from its logits [B, V] (one sampling pass for the batch)."""
        adjust = any(job.settings.repetition_penalty != 1.0 or row.pending or not row.tokens for job, row in rows)
        scores = logits.clone() if adjust else logits
        for b, (job, row) in enumerate(rows):
            if not adjust:
                break
            if job.settings.repetition_penalty != 1.0:
                seen = torch.tensor(job.prompt.tokens + row.tokens, dtype=torch.long)
                scores[b] = apply_repetition_penalty(scores[b], seen, job.settings.repetition_penalty)
            if row.pending and self.healing is not None:
                scores[b] = scores[b].masked_fill(~self.healing.mask(row.pending), float("-inf"))
            if not row.tokens and job.stop == "auto" and job.eos is not None:
                scores[b, job.eos] = float("-inf")  # a suggestion is never empty
        tokens = sample_rows(scores, [job.settings for job, _ in rows], [row.generator for _, row in rows],
                             [row.index if not row.tokens else 0 for _, row in rows])
        chosen = logits[torch.arange(len(rows)), torch.tensor(tokens)]
        logprobs = (chosen - torch.logsumexp(logits, -1)).tolist()  # log-softmax of the chosen tokens only
        for (job, row), token, logprob in zip(rows, tokens, logprobs):
            self._accept(job, row, token, logprob)

    def _accept(self, job: Job, row: Row, token: int, logprob: float) -> None:
        """Append the chosen token and decide whether the row is done."""
        row.tokens.append(token)
        row.logprobs.append(logprob)
        if row.pending:
            b = self.tokenizer.token_bytes(token)
            row.pending = b"" if b.startswith(row.pending) else row.pending[len(b):]
        if token == job.eos:
            row.tokens.pop()
            row.logprobs.pop()
            self._end_row(job, row, "eos")
        elif not row.pending:
            text, stopped = apply_stop(continuation(self.tokenizer, job.prompt, row.tokens), job.stop)
            row.text = text
            if stopped:
                self._end_row(job, row, "stop")
        if row.finish is None and len(row.tokens) >= job.max_new_tokens:
            self._end_row(job, row, "length")
        if row.finish is None and len(job.prompt.tokens) + len(row.tokens) >= self.max_length:
            self._end_row(job, row, "length")

    def _end_row(self, job: Job, row: Row, reason: str) -> None:
        row.finish = reason
        if reason in ("eos", "time", "cancelled", "length") and not row.pending:
            row.text = apply_stop(continuation(self.tokenizer, job.prompt, row.tokens), job.stop)[0]

    def _complete_round(self, job: Job) -> None:
        """Keep the distinct, non-empty suggestions; start replacements while there is time."""
        if job.done.is_set() or job.live_rows():
            return
        for row in sorted(job.rows, key=lambda r: r.index):
            if row.collected:
                continue
            row.collected = True
            key = row.text.strip()
            if key and key not in job.seen_texts and len(job.accepted) < job.n:
                job.seen_texts.add(key)
                job.accepted.append(Suggestion(text=row.text, token_ids=list(row.tokens),
                                               logprobs=list(row.logprobs), finish_reason=row.finish))
        missing = job.n - len(job.accepted)
        now = time.perf_counter()
        if missing and job.rounds < EXTRA_ROUNDS and not job.cancelled and not job.out_of_time(now):
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
        if job in self._running:
            self._running.remove(job)
        if job.slots:  # what the slots hold stays usable as a prefix for later requests
            self.pool.release(job.slots)
        if job.decode_started:
            job.timings.decode_ms = (now - job.decode_started) * 1000
        job.timings.total_ms = (now - job.submitted) * 1000
        if error is None and job.cancelled:
            error = Cancelled("the request was cancelled")
        job.error = error
        job.result = list(job.accepted)
        job.done.set()
        with self._cond:
            self._cond.notify_all()
