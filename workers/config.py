"""Settings of the distributed path, from the environment.

The app's own settings live in app/settings.py; workers never import app, so the queue's
settings are read here and both sides use them.
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit, urlunsplit

TASK_NAME = "wwt.infer"  # the one task; the app sends it by name to a model's queue

WORKER_ENV = {
    "WWT_REDIS_URL": ("redis://localhost:6379/0",
                      "Redis for the Celery broker, results, suggestion cache and documents "
                      "(a password goes in the URL: redis://:PASSWORD@host:6379/0)"),
    "WWT_TASK_SOFT_TIME_LIMIT": ("30", "seconds a request may decode; the engine then stops and returns what it has"),
    "WWT_TASK_TIME_LIMIT": ("60", "hard limit in seconds for one task; the visibility timeout must exceed it"),
    "WWT_VISIBILITY_TIMEOUT": ("", "seconds before a task taken by a worker that died is handed to another "
                                   "worker; empty: twice the hard limit"),
    "WWT_RESTORE_INTERVAL": ("", "seconds between sweeps for tasks left by a dead worker; empty: a quarter of "
                                 "the visibility timeout, at most 10"),
    "WWT_RESULT_EXPIRES": ("300", "seconds a task's result is kept in Redis"),
    "WWT_HEARTBEAT_S": ("5", "seconds between a worker's announcements of the model it serves"),
    "WWT_HEARTBEAT_TTL_S": ("", "seconds an announcement lives; empty: three heartbeats"),
    "WWT_CACHE_TTL_S": ("3600", "seconds a cached suggestion lives in Redis"),
    "WWT_CACHE_MAX_ENTRIES": ("20000", "most suggestion-cache entries kept; the least recently used go first"),
    "WWT_WORKER_NAME": ("", "Celery node name of a worker; empty: <queue>-<pid>@<host>"),
}


def wenv(name: str) -> str:
    return os.environ.get(name, WORKER_ENV[name][0])


def wenv_float(name: str, default: float | None = None) -> float:
    value = wenv(name)
    if value == "" and default is not None:
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, not {value!r}") from None


def redis_url(url: str | None = None) -> str:
    return url or wenv("WWT_REDIS_URL")


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid Redis URL>"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def queue_name(model: str) -> str:
    """The Celery queue of one model: `tiny-gpt2` -> `wwt.tiny-gpt2`.

    Names with other characters (a Hub id `org/repo`, a path) are made safe, with a short
    hash of the original so two different names never share a queue.
    """
    safe = _UNSAFE.sub("_", model)
    if safe != model or not safe:
        import hashlib

        safe = f"{safe}.{hashlib.sha1(model.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"
    return f"wwt.{safe}"
