"""The one task a worker runs: a request dict in, a result dict (or an error dict) out.

A bad request must never kill a worker or fail the task in Celery's eyes: WWTErrors come
back as {"error": {"kind", "message"}} and the app raises them again on its side.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Optional

from model import contract
from model.errors import BadRequest, Cancelled, RequestTimeout, UnknownModel, caller_error
from model.types import REQUEST_TYPES

from . import cancel
from .queues import TASK_NAME
from .partials_channel import Publisher
from .registry import record_holder

log = logging.getLogger("wwt.worker")

# What this process serves: model name -> engine, set by worker.py before consuming starts.
_engines: dict = {}
_redis = None
_node: Optional[str] = None  # this worker's node name in the heartbeat registry (registry.py)
_lock = threading.Lock()

STATS_KEY = "wwt:stats:tasks"
WORKER_STATS_PREFIX = "wwt:stats:worker:"
WORKER_STATS_TTL_S = 7 * 24 * 3600
# Each worker process counts under its own node name (which holds its pid), so every restart
# starts a key: an index by last use keeps the newest MAX_WORKER_STATS and deletes the others.
WORKER_STATS_INDEX = "wwt:stats:workers"
MAX_WORKER_STATS = 64


def serve(name: str, engine, redis_client=None, node: Optional[str] = None) -> None:
    """Make `engine` answer tasks for model `name` in this process; count tasks in `redis_client`.
    `node` is the name this worker announces itself under: each task it takes is recorded under it."""
    global _redis, _node
    with _lock:
        _engines[name] = engine
        if redis_client is not None:
            _redis = redis_client
        if node is not None:
            _node = node


def _record_holder(task, task_id: Optional[str], hostname: str, hard_limit: Optional[float]) -> None:
    """Tell the app which worker runs this task, so it notices at once when that worker dies."""
    client = _redis
    if client is None or not task_id:
        return
    options = getattr(task.app.conf, "broker_transport_options", None) or {}
    visibility = float(options.get("visibility_timeout", 3600))
    restore = float(options.get("unacked_restore_interval", 10))
    try:
        # Lives as long as the task can (its hard limit), plus the wait for its redelivery.
        record_holder(client, task_id, _node or hostname, visibility + restore,
                      ttl=(hard_limit or 60) + visibility + restore)
    except Exception as e:  # the record helps the app fail fast; it must never fail the request
        log.warning("could not record the holder of task %s: %s", task_id, e)


def _count(hostname: str, field: str) -> None:
    """Per-worker and total task counters in Redis: observability, and how tests see who served."""
    client = _redis
    if client is None:
        return
    try:
        key = WORKER_STATS_PREFIX + hostname
        pipe = client.pipeline(transaction=False)
        pipe.hincrby(STATS_KEY, field, 1)
        pipe.hincrby(key, field, 1)
        pipe.expire(key, WORKER_STATS_TTL_S)
        pipe.zadd(WORKER_STATS_INDEX, {hostname: time.time()})
        pipe.expire(WORKER_STATS_INDEX, WORKER_STATS_TTL_S)
        pipe.zcard(WORKER_STATS_INDEX)
        if pipe.execute()[-1] > MAX_WORKER_STATS:
            _forget_old_workers(client)
    except Exception as e:  # counting must never fail a request
        log.warning("could not update task counters: %s", e)


def _forget_old_workers(client) -> None:
    """Delete the counters of all but the MAX_WORKER_STATS most recently counting workers."""
    old = client.zrange(WORKER_STATS_INDEX, 0, -MAX_WORKER_STATS - 1)
    if old:
        pipe = client.pipeline(transaction=False)
        pipe.delete(*[WORKER_STATS_PREFIX + (n.decode() if isinstance(n, bytes) else n) for n in old])
        pipe.zrem(WORKER_STATS_INDEX, *old)
        pipe.execute()


def _request(kind: str, data: dict):
    cls = REQUEST_TYPES.get(kind)
    if cls is None:
        raise BadRequest(f"unknown request kind {kind!r}; expected one of {', '.join(REQUEST_TYPES)}")
    if not isinstance(data, dict):
        raise BadRequest("the request must be a JSON object")
    try:
        request = cls.from_dict(data)
    except TypeError as e:
        raise BadRequest(f"malformed {kind} request: {e}") from None
    # The queue is a boundary: what comes off it is checked here, once (model/contract.py).
    return contract.check_completion(request) if kind == "complete" else request


CANCEL_POLL_S = 0.2  # how often a running completion looks for a cancellation mark


def _complete(engine, request, hard_limit: Optional[float], task_id: Optional[str]):
    """A completion that stops early when the app marks its task stale (see cancel.py)."""
    client = _redis
    if client is None or task_id is None:
        return engine.complete(request, timeout=hard_limit)
    handle = engine.submit(request)
    deadline = None if hard_limit is None else time.monotonic() + hard_limit
    while not handle.wait(CANCEL_POLL_S):
        try:
            stale = cancel.is_cancelled(client, task_id)
        except Exception:  # Redis trouble must not fail the request itself
            stale = False
        if stale or (deadline is not None and time.monotonic() >= deadline):
            handle.cancel()
            break
    return engine.result(handle, timeout=hard_limit)


def _complete_streaming(engine, request, hard_limit: Optional[float], task_id: str):
    """A completion whose snapshots go to the app as they are decoded (partials_channel.py); it stops
    early, as `_complete` does, when the app marks the task stale (the reader went away, or a
    newer request from the same editor)."""
    client = _redis
    publisher = Publisher(client, task_id)
    handle = engine.submit(request)
    checked = time.monotonic()
    try:
        for suggestions in handle.updates(timeout=hard_limit, tick=CANCEL_POLL_S):
            if suggestions is not None:
                publisher.partial(suggestions)
            if time.monotonic() - checked >= CANCEL_POLL_S:
                checked = time.monotonic()
                try:
                    stale = cancel.is_cancelled(client, task_id)
                except Exception:  # Redis trouble must not fail the request itself
                    stale = False
                if stale:
                    handle.cancel()
    except RequestTimeout:
        pass  # cancelled at the hard limit: the answer says so
    return engine.result(handle, timeout=hard_limit)


def run(kind: str, data: dict, soft_limit: Optional[float] = None, hard_limit: Optional[float] = None,
        task_id: Optional[str] = None, stream: bool = False):
    """Answer one request with the engine of its model; returns the result dataclass."""
    request = _request(kind, data)
    engine = _engines.get(request.model) if request.model else (next(iter(_engines.values()), None)
                                                                 if len(_engines) == 1 else None)
    if engine is None:
        raise UnknownModel(f"this worker serves {', '.join(_engines) or 'no model'}, not {request.model!r}")
    if kind == "complete":
        if soft_limit:
            # The threads pool cannot interrupt a thread, so the soft time limit is enforced
            # by the engine itself: decoding stops at max_time and returns what it has.
            request = dataclasses.replace(request, max_time=min(request.max_time or soft_limit, soft_limit))
        # ...and the hard limit bounds the whole wait (queued inside the engine included).
        if stream and task_id is not None and _redis is not None:
            return _complete_streaming(engine, request, hard_limit, task_id)
        return _complete(engine, request, hard_limit, task_id)
    if kind == "classify":
        return engine.classify(request.text, labels=request.labels)
    if kind == "answer":
        return engine.answer(request.question, request.context)
    return engine.score(request.text, request.top_logprobs)


def answer_task(task, kind: str, request: dict, stream: bool = False) -> dict:
    """The Celery task body (bound): never raises for a request's fault. With `stream`, a
    completion's partial suggestions are published as they are decoded (partials_channel.py)."""
    hostname = getattr(task.request, "hostname", None) or "unknown"
    soft_limit = getattr(task.app.conf, "task_soft_time_limit", None)
    hard_limit = getattr(task.app.conf, "task_time_limit", None)
    _count(hostname, "started")
    started = time.perf_counter()
    task_id = getattr(task.request, "id", None)
    _record_holder(task, task_id, hostname, hard_limit)
    try:
        # A stale task is skipped: a newer request from the same editor replaced it, or its caller
        # gave up on it (its worker died and the caller was told so: a late redelivered copy must
        # not run for nobody).
        if task_id and _redis is not None and cancel.is_cancelled(_redis, task_id):
            raise Cancelled("a newer request from the same editor replaced this one" if kind == "complete"
                            else "the caller stopped waiting for this request")
        result = run(kind, request, soft_limit=soft_limit, hard_limit=hard_limit, task_id=task_id,
                     stream=bool(stream)).to_dict()
        _count(hostname, "done")
    except Exception as e:  # a request's fault or an engine bug: reported, and the worker keeps serving
        result = {"error": caller_error(e, log, f"task {task_id or '?'}").to_dict()}
        _count(hostname, "failed")
    result["worker"] = hostname
    result["worker_ms"] = (time.perf_counter() - started) * 1000
    if stream and task_id and _redis is not None:
        Publisher(_redis, task_id).end()  # the reader now takes the result
    return result


def register(app) -> None:
    """Register the task on a Celery app under its fixed name (the app sends it by name)."""
    app.task(name=TASK_NAME, bind=True)(answer_task)


__all__ = ["answer_task", "register", "run", "serve"]
