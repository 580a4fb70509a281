"""Real services for the distributed tests: a password-protected redis-server and `wwt worker`
processes on free loopback ports (the helpers live in app/bench/processes.py, shared with the
queue benchmark), plus the task counters the tests read."""

from __future__ import annotations

from pathlib import Path

import redis

from app.bench.processes import RedisServer, WorkerProcess, free_port, wait_for

__all__ = ["ROOT", "RedisServer", "Worker", "free_port", "total_tasks", "wait_for", "worker_stats"]

ROOT = Path(__file__).resolve().parents[1]


class Worker(WorkerProcess):
    """A `wwt worker` process run from the repository root, as the tests start it."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("cwd", ROOT)
        super().__init__(*args, **kwargs)


def worker_stats(client: redis.Redis, node: str) -> dict:
    """Task counters a worker keeps in Redis: started, done, failed."""
    from workers.tasks import WORKER_STATS_PREFIX

    raw = client.hgetall(WORKER_STATS_PREFIX + node)
    return {k.decode(): int(v) for k, v in raw.items()}


def total_tasks(client: redis.Redis) -> int:
    """Tasks started by any worker so far."""
    from workers.tasks import STATS_KEY

    return int(client.hget(STATS_KEY, "started") or 0)
