"""The interface the UI and the CLI talk to, whether the engine runs here or behind a queue."""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from typing import Callable, Iterator, Optional

from model.errors import BadRequest, UnknownModel, WWTError
from model.streaming import done_event, error_event
from model.types import (Answer, AnswerRequest, Classification, ClassifyRequest, Completion, CompletionRequest,
                         ScoreRequest, Scores)


log = logging.getLogger(__name__)


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
        except WWTError as e:
            event = error_event(e)
        except Exception as e:  # a bug: logged for the operator, a readable line for the reader
            log.exception("streamed completion failed")
            event = error_event(WWTError(f"internal error: {e.__class__.__name__}"))
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


class Backend(ABC):
    """complete / classify / answer / score, plus shared documents.

    Every method either returns a result or raises a `model.errors.WWTError` with a message
    a person can read; nothing else escapes.
    """

    kind = "abstract"
    # Whether complete / stream_complete take a `client` keyword (the caller's address, held to a
    # per-client bound on waiting requests); callers pass it only where this is True.
    admits_clients = False

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

    @abstractmethod
    def complete(self, request: CompletionRequest, timeout: Optional[float] = None,
                 supersede: Optional[str] = None) -> Completion:
        """Suggestions for `request`. With `supersede` (say, one editor's id), a newer request with
        the same key cancels this one if it is still running: its answer would be stale."""

    def stream_complete(self, request: CompletionRequest, timeout: Optional[float] = None,
                        supersede: Optional[str] = None) -> EventStream:
        """`complete` as it is written: an EventStream of partial events, then one done or error
        event (model/streaming.py). This default has no partials: one done event when the answer
        is there; backends that can do better override it."""
        def events():
            yield done_event(self.complete(request, timeout, supersede))

        return EventStream(events())

    @abstractmethod
    def classify(self, request: ClassifyRequest, timeout: Optional[float] = None) -> Classification: ...

    @abstractmethod
    def answer(self, request: AnswerRequest, timeout: Optional[float] = None) -> Answer: ...

    @abstractmethod
    def score(self, request: ScoreRequest, timeout: Optional[float] = None) -> Scores: ...

    @abstractmethod
    def save_document(self, text: str, client: Optional[str] = None) -> str:
        """Store a document; returns an unguessable id for a share link. `client` (the caller's
        address) is held to the per-client share rate; a refusal (LimitReached) stores nothing."""

    @abstractmethod
    def load_document(self, doc_id: str) -> str: ...

    def delete_document(self, doc_id: str) -> None:
        """Delete a shared document: whoever holds the link (the id) may. BadRequest when there is none."""
        raise BadRequest("this app cannot delete shared documents")

    def close(self) -> None:
        """Release what the backend holds (engines, connections)."""
