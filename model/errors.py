"""Errors a user can see. Each carries a `kind` so it survives the queue as JSON."""


class WWTError(Exception):
    """Base of every error the project reports to a person (never a traceback)."""

    kind = "error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict:
        return {"kind": self.kind, "message": self.message}


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


class LimitReached(WWTError):
    """A limit that protects the service was reached (share rate, storage, body size); nothing was stored."""

    kind = "limit"


class Busy(WWTError):
    """Too many requests are waiting (for this model, or from this client); nothing was queued.
    Asking again in a moment is the remedy."""

    kind = "busy"


_KINDS = {
    cls.kind: cls
    for cls in (WWTError, BadRequest, UnknownModel, CheckpointError, NoWorker,
                BackendUnavailable, WorkerFailed, RequestTimeout, Cancelled, LimitReached, Busy)
}


def error_from_dict(data: dict) -> WWTError:
    """Rebuild an error that crossed the queue as JSON."""
    cls = _KINDS.get(data.get("kind", "error"), WWTError)
    return cls(str(data.get("message", "unknown error")))
