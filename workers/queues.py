"""What the app and the workers agree on about the queue: the task's name, each model's queue,
the Redis URL (with its password kept out of messages), the queue's configuration (time limits,
redelivery, announcements) and the error for settings that contradict each other.

Every setting itself (name, default, meaning) is in the one registry, `model/settings.py`;
`QueueConfig.from_settings()` reads them once, at an entry point (`wwt worker`, `wwt serve`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit, urlunsplit

from model import settings
from model.errors import BackendUnavailable

TASK_NAME = "wwt.infer"  # the one task; the app sends it by name to a model's queue


class QueueMisconfigured(BackendUnavailable):
    """The queue's settings contradict each other (or one is not a number); nothing was started."""

    def __init__(self, problem: str):
        super().__init__(f"the queue is misconfigured: {problem}")


DEFAULT_REDIS_URL = "redis://localhost:6379/0"  # the registry's default of WWT_REDIS_URL


def redis_url(url: str | None = None) -> str:
    return url or DEFAULT_REDIS_URL


@dataclass(frozen=True)
class QueueConfig:
    """The queue's time limits, redelivery and announcements, checked for consistency when made.

    Defaults chosen so that redelivery can help a waiting caller: with the default request timeout
    (60 s), a task whose worker died is handed to another worker after visibility + one sweep
    (20 + 10 + 5 = 35 s) and decodes for at most the soft limit (15 s)."""

    soft_time_limit: float = 15.0   # a request's decoding stops here (tasks.py caps max_time)
    time_limit: float = 20.0        # hard limit of one task
    visibility_timeout: Optional[float] = None  # a dead worker's task goes to another; None: hard + 10
    restore_interval: Optional[float] = None    # sweeps for such tasks; None: min(5, visibility / 4)
    result_expires: float = 300.0
    heartbeat_s: float = 5.0        # a worker's announcement interval...
    heartbeat_ttl_s: Optional[float] = None     # ...and lifetime; None: three heartbeats

    def __post_init__(self):
        soft, hard = self.soft_time_limit, self.time_limit
        if not 0 < soft <= hard:
            raise QueueMisconfigured(f"WWT_TASK_SOFT_TIME_LIMIT ({soft:g}) must be positive and at most "
                                     f"WWT_TASK_TIME_LIMIT ({hard:g})")
        if self.visibility_timeout is None:
            object.__setattr__(self, "visibility_timeout", hard + 10)
        if self.visibility_timeout <= hard:
            # Redis has no real acknowledgements: a task not acknowledged within the visibility
            # timeout is handed to another worker. If that could happen while the first worker is
            # still legitimately running it (within its hard limit), every long task would run twice.
            raise QueueMisconfigured(f"WWT_VISIBILITY_TIMEOUT ({self.visibility_timeout:g} s) must be longer than "
                                     f"WWT_TASK_TIME_LIMIT ({hard:g} s)")
        restore = self.restore_interval if self.restore_interval is not None else min(5.0, self.visibility_timeout / 4)
        object.__setattr__(self, "restore_interval", max(0.1, restore))
        if self.heartbeat_ttl_s is None:
            object.__setattr__(self, "heartbeat_ttl_s", 3 * self.heartbeat_s)
        if self.heartbeat_ttl_s <= self.heartbeat_s:
            raise QueueMisconfigured(f"WWT_HEARTBEAT_TTL_S ({self.heartbeat_ttl_s:g}) must be longer than "
                                     f"WWT_HEARTBEAT_S ({self.heartbeat_s:g})")

    @classmethod
    def from_settings(cls) -> "QueueConfig":
        """The registry's values; QueueMisconfigured (naming the variable) for one that is not a number."""
        try:
            return cls(soft_time_limit=settings.get_float("WWT_TASK_SOFT_TIME_LIMIT"),
                       time_limit=settings.get_float("WWT_TASK_TIME_LIMIT"),
                       visibility_timeout=settings.get_float("WWT_VISIBILITY_TIMEOUT", default=None),
                       restore_interval=settings.get_float("WWT_RESTORE_INTERVAL", default=None),
                       result_expires=settings.get_float("WWT_RESULT_EXPIRES"),
                       heartbeat_s=settings.get_float("WWT_HEARTBEAT_S"),
                       heartbeat_ttl_s=settings.get_float("WWT_HEARTBEAT_TTL_S", default=None))
        except settings.SettingError as e:
            raise QueueMisconfigured(str(e)) from None


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
