"""The interface the UI, the APIs and the CLI talk to, whether the engine runs here or behind a queue.

A backend has one completion primitive, `stream`: a request in, events out (partials, then one
answer or one error; model/streaming.py). Everything else that completes text (the
non-streaming `complete`, the page, the named endpoints, the SSE route, the CLI) is built on it,
so the suggestion cache, the waiting bounds and supersede are written once per backend.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from abc import ABC, abstractmethod
from typing import Callable, Iterator, Optional

from model.errors import Busy, UnknownModel, WWTError, caller_error
from model.streaming import done_event, error_event
from model.types import (Answer, AnswerRequest, Classification, ClassifyRequest, Completion, CompletionRequest,
                         ScoreRequest, Scores)


log = logging.getLogger(__name__)


# The engine's KV-cache gauges a backend reports per model (Engine.kv_gauges): positions used and
# free, evictions, prompt tokens reused and prefilled (the last three only grow).
KV_GAUGES = ("kv_tokens_used", "kv_tokens_free", "kv_evictions", "tokens_reused", "tokens_prefilled")

class EventStream:
    """The events of one streamed completion (model/streaming.py): iterate them on one thread;
    `cancel()` may come from any other (an HTTP client that went away) and stops the work.

    Nothing escapes as an exception: a failure is the last event, {"type": "error", ...}.
    """

    def __init__(self, events: Iterator[dict]):
        self._events = iter(events)
        self._lock = threading.Lock()
        self._on_cancel: list[Callable[[], None]] = []
        self.cancelled = False
        self.ended = False
        self.error: Optional[WWTError] = None  # the error the last event reports, with its operator detail
        self.completion: Optional[Completion] = None  # the answer the done event carries, as an object

    def done(self, completion: Completion) -> dict:
        """(the producing generator) The done event for `completion`, which is also kept as it is,
        so a caller in this process (Backend.complete) takes it without a round trip through JSON."""
        self.completion = completion
        return done_event(completion)

    def on_cancel(self, fn: Callable[[], None]) -> None:
        """Call `fn` when the stream is cancelled (at once if it already was)."""
        with self._lock:
            if not self.cancelled:
                self._on_cancel.append(fn)
                return
        fn()

    def cancel(self) -> None:
        with self._lock:
            if self.cancelled:
                return
            self.cancelled = True
            calls, self._on_cancel = self._on_cancel, []
        for fn in calls:
            try:
                fn()
            except Exception:  # a cancellation that fails leaves the work to its own timeout
                log.warning("cancelling a stream failed", exc_info=True)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.ended:
            raise StopIteration
        try:
            event = next(self._events)
        except StopIteration:
            self.ended = True
            raise
        except Exception as e:  # one place decides what the reader is told (model/errors.py)
            self.error = caller_error(e, log, "completion")
            event = error_event(self.error)
        if event.get("type") in ("done", "error"):
            self.ended = True
            self._close_events()
        return event

    def close(self) -> None:
        """(the iterating thread) Stop: the work is cancelled if it has not ended."""
        if not self.ended:
            self.cancel()
        self.ended = True
        self._close_events()

    def _close_events(self) -> None:
        close = getattr(self._events, "close", None)  # a generator runs its cleanup (finally) now
        if close is not None:
            close()


def answer_of(events: EventStream) -> Completion:
    """The answer a stream ends with (its partials skipped), or its error raised; the stream is closed."""
    try:
        for event in events:
            if event["type"] == "done":
                return events.completion or Completion.from_dict(event["result"])
            if event["type"] == "error":
                raise events.error or WWTError(event.get("error") or "no answer")
    finally:
        events.close()
    raise WWTError("the answer was cut off; try again")


class ClientBound:
    """Requests of each client in flight through this app process: `bound` at most
    (WWT_MAX_WAITING_PER_CLIENT). The distributed backend holds every request to it; the embedded
    one its single passes (classify, answer, score), its completions being held by the engine's
    own per-client bound. A Compare holds one place for all its models (`Backend.one_place`).
    A request under a supersede key takes the place of the older one under that key (which is
    being cancelled), so a fast typist is never refused because of their own older keystrokes."""

    def __init__(self, bound: Optional[int]):
        self.bound = bound or 0  # 0: no bound
        self._lock = threading.Lock()
        self._held: dict[str, dict] = {}  # client -> {place: the request holding it}

    @contextlib.contextmanager
    def hold(self, client: Optional[str], model: str, supersede: Optional[str] = None, weight: int = 1):
        """Hold `weight` places (a call that makes several completions) for the block."""
        bound = self.bound
        if client is None or not bound:
            yield
            return
        me = object()
        places = [supersede if supersede is not None else me] + [object() for _ in range(weight - 1)]
        with self._lock:
            mine = self._held.setdefault(client, {})
            if len(mine) + sum(p not in mine for p in places) > bound:
                if not mine:
                    self._held.pop(client, None)
                raise Busy(f"busy: {len(mine)} of your requests are already waiting for {model}; "
                           f"try again in a moment")
            for place in places:
                mine[place] = me
        try:
            yield
        finally:
            with self._lock:
                mine = self._held.get(client, {})
                for place in places:
                    if mine.get(place) is me:
                        del mine[place]
                if not mine:
                    self._held.pop(client, None)


class Backend(ABC):
    """complete / classify / answer / score, plus shared documents, health and queue depth.

    Every method either returns a result or raises a `model.errors.WWTError` with a message
    a person can read. `client` is who asks (an IP address, else an editor id): the per-client
    bounds count by it. `timeout` None means the backend's configured request timeout.
    """

    kind = "abstract"  # a display string ("local", "celery"); nothing branches on it

    @abstractmethod
    def models(self) -> list[str]:
        """Names of the models this backend offers, the default first."""

    def default_model(self) -> str:
        """The model a request without one goes to: the first offered (settings.model_specs' order)."""
        offered = self.models()
        if not offered:
            raise UnknownModel("no model is available")
        return offered[0]

    @abstractmethod
    def model_info(self, name: str) -> dict:
        """What is known about a model without running it (parameters, loaded, device...)."""

    def prepare(self, name: str) -> None:
        """Make `name` ready to answer now (embedded: load it, with its download in the log); a
        backend whose models live elsewhere has nothing to do."""

    # -- completion: one primitive ---------------------------------------------------------
    @abstractmethod
    def stream(self, request: CompletionRequest, *, client: Optional[str] = None, supersede: Optional[str] = None,
               timeout: Optional[float] = None, partials: bool = True) -> EventStream:
        """The completion as it is written: partial events, then one done or one error event.

        `supersede` (one editor's id): a newer request with the same key cancels this one while it
        runs (its answer would be stale) and takes its waiting place. `partials=False`: nobody reads
        partials, so none are built or carried; the stream is the answer alone. Cancelling the
        stream stops the work. Later modes (raw completions, partials with token ids) are more
        keywords of this one call."""

    def complete(self, request: CompletionRequest, *, client: Optional[str] = None, supersede: Optional[str] = None,
                 timeout: Optional[float] = None) -> Completion:
        """The answer of `stream`, waited for; its error raised."""
        return answer_of(self.stream(request, client=client, supersede=supersede, timeout=timeout, partials=False))

    # -- single passes ---------------------------------------------------------------------
    @abstractmethod
    def classify(self, request: ClassifyRequest, timeout: Optional[float] = None,
                 client: Optional[str] = None) -> Classification: ...

    @abstractmethod
    def answer(self, request: AnswerRequest, timeout: Optional[float] = None, client: Optional[str] = None) -> Answer: ...

    @abstractmethod
    def score(self, request: ScoreRequest, timeout: Optional[float] = None, client: Optional[str] = None) -> Scores: ...

    # -- shared documents ------------------------------------------------------------------
    @abstractmethod
    def save_document(self, text: str, client: Optional[str] = None) -> tuple[str, str]:
        """Store a document: (an unguessable id for a share link, which reads it; a delete key for
        its author alone, stored only as a hash). `client` is held to the per-client share rate; a
        refusal (LimitReached, saying which limit) stores nothing."""

    @abstractmethod
    def load_document(self, doc_id: str) -> str:
        """The document's text; NotFound when there is none (expired or deleted)."""

    @abstractmethod
    def delete_document(self, doc_id: str, delete_key: Optional[str]) -> None:
        """Delete a shared document with its delete key: Forbidden without it (the link alone only
        reads), NotFound when there is none."""

    # -- what operations read --------------------------------------------------------------
    @abstractmethod
    def health(self) -> dict:
        """{"ready": bool, "backend": kind, "model": the default, "reason": why not, ...} for /healthz.
        Never raises; a reason is fit for anyone to read (no addresses)."""

    @abstractmethod
    def model_gauges(self) -> dict[str, dict]:
        """Per offered model, what /metrics shows: {"queue_depth": n, and "loaded" (0/1) or
        "live_workers": n, and the engines' KV_GAUGES where known}. Raises BackendUnavailable when
        the state cannot be read."""

    clients: ClientBound = ClientBound(None)  # each backend sets its own, from its configuration

    def one_place(self, client: Optional[str], what: str):
        """A context in which `client` holds one place of its bound (Busy at once past it): several
        requests made for one call (a Compare over several models) count as one of the client's."""
        return self.clients.hold(client, what)

    def cache_stats(self) -> dict:
        """Suggestion-cache counters ({"hits", "incremental_hits", "misses"}), {} without a cache."""
        return {}

    def security_warning(self, for_operator: bool = True) -> Optional[str]:
        """A warning about how the backend is set up (say, Redis without a password off loopback),
        or None. `for_operator=False`: the same without addresses, for the page."""
        return None

    def close(self) -> None:
        """Release what the backend holds (engines, connections)."""
