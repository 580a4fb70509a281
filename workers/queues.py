"""What the app and the workers agree on about the queue: the task's name, each model's queue,
the Redis URL (with its password kept out of messages), and the error for settings that
contradict each other.

Every setting itself (name, default, meaning) is in the one registry, `model/settings.py`.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

from model import settings
from model.errors import BackendUnavailable

TASK_NAME = "wwt.infer"  # the one task; the app sends it by name to a model's queue


class QueueMisconfigured(BackendUnavailable):
    """The queue's settings contradict each other (or one is not a number); nothing was started."""

    def __init__(self, problem: str):
        super().__init__(f"the queue is misconfigured: {problem}")


def redis_url(url: str | None = None) -> str:
    return url or settings.get("WWT_REDIS_URL")


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


LOOPBACK = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}


def insecure_redis_warning(url: str, name_url: bool = True) -> str | None:
    """A warning when the Redis URL names no password and a host other than this machine:
    anyone who can reach that address can read the documents and queue work. None otherwise.

    `name_url=False` leaves the address out (the page shows the warning to every visitor; the
    logs name it)."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        password = parts.password
    except ValueError:
        return None
    if parts.scheme == "unix" or password or not host or host in LOOPBACK or host.startswith("127."):
        return None
    where = f"Redis at {redact(url)}" if name_url else "Redis"
    return (f"{where} is used without a password on a non-loopback address: anyone who can "
            "reach it can read shared documents and queue work; give Redis a password (--requirepass) "
            "and put it in the URL: redis://:PASSWORD@host:6379/0")


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
