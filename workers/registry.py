"""Which workers serve which models, from announcements that expire.

Each worker keeps one key per model it serves, `wwt:worker:<model>:<node>`, alive with a
heartbeat (SET with a TTL). Expiry is Redis's own clock, so machines with skewed clocks
agree; a worker that dies simply stops renewing and disappears within one TTL. The set
`wwt:serving:<model>` lists candidate nodes so readers never SCAN the keyspace.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Callable, Optional

from .affinity import drop_orphaned_queues

log = logging.getLogger("wwt.registry")

MODELS_KEY = "wwt:models"
SERVING_PREFIX = "wwt:serving:"
WORKER_PREFIX = "wwt:worker:"


def _s(value) -> str:
    return value.decode("utf-8", "surrogatepass") if isinstance(value, bytes) else value


def announce(client, model: str, node: str, info: dict, ttl: float) -> None:
    """Say (again) that `node` serves `model`, for the next `ttl` seconds."""
    payload = json.dumps({**info, "model": model, "node": node, "seen": time.time()})
    pipe = client.pipeline(transaction=True)
    pipe.set(f"{WORKER_PREFIX}{model}:{node}", payload, px=int(ttl * 1000))
    pipe.sadd(SERVING_PREFIX + model, node)
    pipe.sadd(MODELS_KEY, model)
    pipe.execute()


def withdraw(client, model: str, node: str) -> None:
    """A worker that stops cleanly leaves at once, so the app says "no worker" without waiting."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(f"{WORKER_PREFIX}{model}:{node}")
    pipe.srem(SERVING_PREFIX + model, node)
    pipe.execute()


def live_workers(client, model: str) -> list[dict]:
    """The announcements of the workers serving `model` now; forgets nodes that stopped renewing."""
    nodes = sorted(_s(n) for n in client.smembers(SERVING_PREFIX + model))
    if not nodes:
        return []
    values = client.mget([f"{WORKER_PREFIX}{model}:{n}" for n in nodes])
    live, dead = [], []
    for node, value in zip(nodes, values):
        if value is None:
            dead.append(node)
            continue
        try:
            live.append(json.loads(_s(value)))
        except json.JSONDecodeError:
            dead.append(node)
    if dead:
        client.srem(SERVING_PREFIX + model, *dead)
    return live


HOLDER_PREFIX = "wwt:holder:"  # task id -> the worker node running it now (JSON), for a short while


def record_holder(client, task_id: str, node: str, redeliver_s: float, ttl: float) -> None:
    """Say that `node` runs task `task_id` now. `redeliver_s` is how long after a worker takes a task
    the broker hands it to another worker if the first one died (visibility timeout plus one restore
    sweep): the app waiting for the task uses it to decide whether waiting for redelivery can help.
    A redelivered copy overwrites the record with its new worker."""
    payload = json.dumps({"node": node, "redeliver_s": redeliver_s})
    client.set(HOLDER_PREFIX + task_id, payload, px=max(1, int(ttl * 1000)))


def task_holder(client, task_id: str) -> Optional[dict]:
    """The record of the worker that took `task_id`, or None while it waits in the queue."""
    value = client.get(HOLDER_PREFIX + task_id)
    if value is None:
        return None
    try:
        return json.loads(_s(value))
    except json.JSONDecodeError:
        return None


def served_models(client) -> dict[str, list[dict]]:
    """Every model with at least one live worker, and its workers."""
    out = {}
    for model in sorted(_s(m) for m in client.smembers(MODELS_KEY)):
        workers = live_workers(client, model)
        if workers:
            out[model] = workers
        elif not client.exists(SERVING_PREFIX + model):
            client.srem(MODELS_KEY, model)
    return out


class Heartbeat:
    """A daemon thread that re-announces a worker's model every `interval` seconds.

    Redis being briefly unreachable is logged, not fatal: the next beat announces again.
    """

    def __init__(self, client, model: str, node: str, info: dict, interval: float = 5.0, ttl: float = 15.0,
                 live: Optional[Callable[[], dict]] = None):
        """`interval` and `ttl`: QueueConfig.heartbeat_s and heartbeat_ttl_s. `live` gives the facts that
        change (the engine's KV-cache gauges), read at every beat."""
        self.client, self.model, self.node, self.info = client, model, node, info
        self.live = live
        self.interval = interval
        self.ttl = max(ttl, 2 * self.interval)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._failing = False

    def beat(self) -> bool:
        try:
            info = self.info
            if self.live is not None:
                try:
                    info = {**info, **self.live()}
                except Exception as e:  # a fact missing for one beat; the worker is alive all the same
                    log.debug("live facts unavailable: %s", e)
            announce(self.client, self.model, self.node, info, self.ttl)
            if self.info.get("queue"):
                drop_orphaned_queues(self.client, self.model, self.info["queue"])
        except Exception as e:
            if not self._failing:
                log.warning("cannot announce %s to Redis (will keep trying): %s", self.model, e)
            self._failing = True
            return False
        if self._failing:
            log.info("announcing %s again", self.model)
        self._failing = False
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def start(self) -> "Heartbeat":
        self.beat()
        self._thread = threading.Thread(target=self._run, name=f"wwt-heartbeat-{self.model}", daemon=True)
        self._thread.start()
        return self

    def stop(self, withdraw_now: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if withdraw_now:
            try:
                withdraw(self.client, self.model, self.node)
            except Exception as e:
                log.warning("could not withdraw %s from Redis: %s", self.model, e)
