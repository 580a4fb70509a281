"""Errors a user can see, and the one place any exception becomes what its caller is told.

Each error carries a `kind` so it survives the queue as JSON, a `message` that anyone may read
(a visitor of a public page included), and an optional `detail` for the operator only (the
log and the command line): addresses, ports, a library's own words.
"""

from __future__ import annotations

import copy
import logging
import secrets

VISITOR, OPERATOR = "visitor", "operator"  # who reads an error: anyone, or whoever runs the service


class WWTError(Exception):
    """Base of every error the project reports to a person (never a traceback)."""

    kind = "error"

    def __init__(self, message: str, detail: str = ""):
        super().__init__(detail or message)  # str(error): the operator's text
        self.message = message
        self.detail = detail

    def text_for(self, audience: str) -> str:
        """What `audience` (VISITOR or OPERATOR) is told."""
        return (self.detail or self.message) if audience == OPERATOR else self.message

    def to_dict(self) -> dict:
        return {"kind": self.kind, "message": self.message, **({"detail": self.detail} if self.detail else {})}


class BadRequest(WWTError):
    """The input or a setting is out of range; nothing was changed."""

    kind = "bad_request"


class UnknownModel(WWTError):
    """The model name is neither a known short name, a Hub id nor a local folder."""

    kind = "unknown_model"


class CheckpointError(WWTError):
    """A checkpoint is missing, malformed, or in a format we refuse to load."""

    kind = "checkpoint"


class NoWorker(WWTError):
    """No worker is serving the requested model."""

    kind = "no_worker"


class BackendUnavailable(WWTError):
    """The queue (Redis) cannot be reached."""

    kind = "backend_unavailable"


class WorkerFailed(WWTError):
    """A worker accepted the task and failed it."""

    kind = "worker_failed"


class RequestTimeout(WWTError):
    """The answer did not come back in time."""

    kind = "timeout"


class Cancelled(WWTError):
    """The request was cancelled before it finished."""

    kind = "cancelled"


class NotFound(BadRequest):
    """There is no such thing (a shared document that expired or was deleted)."""

    kind = "not_found"


class Forbidden(WWTError):
    """The caller may not do this (delete a document without its delete key); nothing was changed."""

    kind = "forbidden"


class LimitReached(WWTError):
    """A limit that protects the service was reached (share rate, storage, body size); nothing was stored.
    `limit` says which ("rate", "storage", "size"); `retry_after` (seconds) when waiting helps."""

    kind = "limit"

    def __init__(self, message: str, detail: str = "", limit: str = "", retry_after: float | None = None):
        super().__init__(message, detail)
        self.limit = limit
        self.retry_after = retry_after


class Busy(WWTError):
    """Too many requests are waiting (for this model, or from this client); nothing was queued.
    Asking again in a moment is the remedy."""

    kind = "busy"


_KINDS = {
    cls.kind: cls
    for cls in (WWTError, BadRequest, UnknownModel, CheckpointError, NoWorker,
                BackendUnavailable, WorkerFailed, RequestTimeout, Cancelled, LimitReached, Busy, NotFound,
                Forbidden)
}


def error_from_dict(data: dict) -> WWTError:
    """Rebuild an error that crossed the queue (or an event stream) as JSON."""
    cls = _KINDS.get(data.get("kind", "error"), WWTError)
    return cls(str(data.get("message", "unknown error")), str(data.get("detail") or ""))


def caller_error(exc: BaseException, log: logging.Logger, doing: str = "request") -> WWTError:
    """Any exception as the WWTError its caller is given. Every edge (page, Gradio API, SSE, worker
    result, command line) turns exceptions into answers here, then picks `text_for(audience)`.

    A WWTError without detail is passed on as it is. One with an operator's detail (an address, a
    library's words) keeps it for the operator: the log gets it under a short reference, and the
    visitor's message ends with that reference, so a report can be matched to the log line.
    Anything else is a bug: logged with its traceback under a reference, and the caller reads
    a plain line with the same reference."""
    if isinstance(exc, WWTError):
        if not exc.detail or getattr(exc, "ref", None):
            return exc
        ref = secrets.token_hex(4)
        log.warning("%s [ref %s]: %s", doing, ref, exc.detail)
        told = copy.copy(exc)
        told.message, told.ref = f"{exc.message} (ref {ref})", ref
        return told
    ref = secrets.token_hex(4)
    log.error("%s failed [ref %s]", doing, ref, exc_info=(type(exc), exc, exc.__traceback__))
    error = WWTError(f"internal error ({exc.__class__.__name__}); the app is still running, try again (ref {ref})")
    error.ref = ref
    return error
