"""The backend that hands requests to Celery workers through Redis.

Same interface as the embedded backend. Every wait has a timeout; every failure is one of
the project's errors with a message a person can act on:
BackendUnavailable (Redis cannot be reached), NoWorker (no worker serves the model, said at
once), WorkerFailed (a worker failed the task), RequestTimeout, UnknownModel.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from typing import Optional

import redis
from celery.exceptions import TimeoutError as CeleryTimeout
from kombu.exceptions import OperationalError

from model.errors import (BackendUnavailable, Busy, Cancelled, NoWorker, RequestTimeout, UnknownModel, WorkerFailed,
                          caller_error, error_from_dict)
from model.network.config import GPTConfig
from model.network.known import KNOWN_MODELS, KNOWN_SHAPES, parse_model_spec
from model.streaming import GrowOnly, partial_event, partials_of
from model.types import RESULT_TYPES, CompletionRequest
from workers import affinity, cancel
from workers.celery_app import make_app
from workers.queues import TASK_NAME, QueueConfig, insecure_redis_warning, queue_name, redact
from workers.partials_channel import Subscription
from workers.queues import redis_url as default_redis_url
from workers.registry import live_workers, served_models, task_holder
from workers.suggestion_cache import SuggestionCache

from .base import KV_GAUGES, Backend, ClientBound, EventStream
from .documents import RedisDocumentStore

log = logging.getLogger(__name__)

_REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.InvalidResponse,
                 OperationalError,
                 ConnectionError, OSError)
SERVED_CACHE_S = 1.0  # a model seen served is trusted this long without asking Redis again
CHECK_EVERY_S = 1.0   # while waiting, how often to check that the model (and the task's worker) is alive
REDELIVERY_MARGIN_S = 2.0  # wait for a dead worker's task to be redelivered only if it comes this early
QUEUE_TTL_MARGIN_S = 60.0  # a queue list outlives the last message sent to it by at most this long


class _Watch:
    """What one request's wait knows about the task's workers: when each worker that took it was
    first seen (the app's own clock), what to say if the wait ends at the deadline, and how to send
    the task again if it was routed to one worker (affinity.py) and that worker died."""

    def __init__(self, name: str, task_id: str, deadline: float, routed: Optional[str] = None,
                 resend=None):
        self.name, self.task_id, self.deadline = name, task_id, deadline
        self.routed, self.resend = routed, resend  # the node the task was routed to; resend() -> None
        self.gone: set[str] = set()  # nodes that died holding the task before it was sent again
        self.first_seen: dict[str, float] = {}
        self.note = ""


class CeleryBackend(Backend):
    kind = "celery"

    def __init__(self, model_specs: Optional[list] = None, redis_url: str = "redis://localhost:6379/0", *,
                 timeout: float = 60.0, cache: bool = True, affinity: bool = True, max_waiting: Optional[int] = 32,
                 max_waiting_per_client: Optional[int] = 4, cache_ttl_s: Optional[float] = None,
                 cache_max_entries: Optional[int] = None, documents: Optional[dict] = None,
                 queue: Optional[QueueConfig] = None):
        """`timeout`: how long a call waits when it names none; `affinity`: route a document's
        completions to the worker holding its prefix (workers/affinity.py); `max_waiting`: tasks
        that may wait in a model's queues (all app processes); `max_waiting_per_client`: requests
        one client may have in flight through this process; `documents`: the document store's
        limits (RedisDocumentStore's keywords); `queue`: the queue's time limits (QueueConfig).
        None or 0: no bound."""
        self.url = default_redis_url(redis_url)
        self.names = [parse_model_spec(s).name for s in (model_specs or []) if s and s.strip()]
        # the spec each name was given as (`tiny=/path@int8`): what a worker for it must be started with
        self.specs = {parse_model_spec(s).name: s.strip() for s in (model_specs or []) if s and s.strip()}
        self.timeout = timeout
        self.affinity = affinity
        self.max_waiting = max_waiting or 0
        self.celery = make_app(self.url, queue)
        self.redis = redis.Redis.from_url(self.url, socket_connect_timeout=2, socket_timeout=10)
        self.cache = SuggestionCache(self.redis, ttl_s=cache_ttl_s, max_entries=cache_max_entries) if cache else None
        self.documents = RedisDocumentStore(self.redis, **(documents or {}))
        self._live: dict[str, tuple[float, list]] = {}  # model -> (when asked, its live workers)
        self._served_list: tuple[float, list] = (-1e9, [])
        self._lock = threading.Lock()
        self.clients = ClientBound(max_waiting_per_client)

    # -- models -------------------------------------------------------------------------
    def models(self) -> list[str]:
        """The configured models, then any other model a worker serves (asked at most once a second)."""
        names = list(self.names)
        now = time.monotonic()
        served = self._served_list
        if now - served[0] >= SERVED_CACHE_S:
            try:
                served = self._served_list = (now, list(self._redis(served_models, self.redis)))
            except BackendUnavailable:
                pass  # the configured names are still worth showing; requests will say what is wrong
        return names + [m for m in served[1] if m not in names]

    def model_info(self, name: str) -> dict:
        name = name or self._default()
        info = {"name": name, "backend": self.kind}
        try:
            workers = self._redis(live_workers, self.redis, name)
        except BackendUnavailable as e:  # a status card should still render, saying why
            workers, info["error"] = [], e.message
        info.update(served=bool(workers), workers=workers)
        if workers:
            for key in ("device", "dtype", "precision", "parameters", "memory_bytes", "weight_bytes", "heads",
                        "n_layer", "n_embd"):
                if key in workers[0]:
                    info[key] = workers[0][key]
        elif name in KNOWN_SHAPES:  # its size is known without a worker
            model_type = "openai-gpt" if name == "openai-gpt" else "gpt2"
            info["parameters"] = GPTConfig(**KNOWN_SHAPES[name], model_type=model_type).parameter_count()
        return info

    def _spec(self, name: str) -> str:
        """How to start a worker for `name`: the spec the app was given (a folder needs `name=folder`)."""
        return self.specs.get(name, name)

    def _default(self) -> str:
        names = self.names or self.models()
        if not names:
            raise NoWorker("no model is configured and no worker is serving one; start one with "
                           "`wwt worker --model gpt2`")
        return names[0]

    def _workers(self, name: str) -> list[dict]:
        """The live workers of `name`, asked of Redis at most once a SERVED_CACHE_S."""
        now = time.monotonic()
        asked, workers = self._live.get(name, (-1e9, []))
        if now - asked >= SERVED_CACHE_S or not workers:
            workers = self._redis(live_workers, self.redis, name)
            with self._lock:
                self._live[name] = (now, workers)
        return workers

    def _resolve(self, name: str) -> str:
        """The model's name if some worker serves it now; else NoWorker or UnknownModel, at once."""
        name = name or self._default()
        if self._workers(name):
            return name
        if name in self.names or name in KNOWN_MODELS:
            raise NoWorker(f"no worker is serving {name}; start one with `wwt worker --model {self._spec(name)}`")
        raise UnknownModel(f"unknown model {name!r}: it is not a known model "
                           f"({', '.join(KNOWN_MODELS)}) and no worker is serving it")

    # -- requests -----------------------------------------------------------------------
    def classify(self, request, timeout=None, client=None):
        with self.clients.hold(client, request.model or self._default()):
            return self._call("classify", request, timeout, time.perf_counter())

    def answer(self, request, timeout=None, client=None):
        with self.clients.hold(client, request.model or self._default()):
            return self._call("answer", request, timeout, time.perf_counter())

    def score(self, request, timeout=None, client=None):
        with self.clients.hold(client, request.model or self._default()):
            return self._call("score", request, timeout, time.perf_counter())

    def _call(self, kind: str, request, timeout: Optional[float], started: float, supersede: Optional[str] = None):
        """Send one task to the model's queue and wait for its answer, within `timeout`."""
        timeout = self.timeout if timeout is None else timeout
        pending, watch = self._send(kind, request, timeout, supersede)
        try:
            return self._answer(kind, pending, watch.name, timeout, started, watch=watch)
        finally:
            self._forget(pending)

    def _send(self, kind: str, request, timeout: float, supersede: Optional[str] = None,
              task_id: Optional[str] = None, stream: bool = False):
        """(the task's AsyncResult, its _Watch): the task is on a queue of the model.

        A completion goes to the worker that owns its document (affinity.py) unless that worker's
        own queue already has a backlog; everything else goes to the model's shared queue. Busy,
        sending nothing, when WWT_MAX_WAITING tasks already wait in those queues."""
        name = self._resolve(request.model)
        request = dataclasses.replace(request, model=name)
        workers = self._workers(name)
        routable = kind == "complete" and self.affinity
        owner = self._redis(affinity.route, self.redis, name, request.text, workers) if routable else None
        shared = queue_name(name)
        queue = self._admit(name, shared, workers, owner)
        routed = owner["node"] if queue != shared else None
        task_id = task_id or str(uuid.uuid4())
        deadline = time.monotonic() + timeout
        args = [kind, request.to_dict()]
        options = {"kwargs": {"stream": True} if stream else None, "task_id": task_id}

        def publish(to: str, seconds: float):
            result = None
            try:
                result = self.celery.send_task(TASK_NAME, args=args, queue=to, expires=seconds, **options)
                # A queue nobody consumes (its worker died) must not keep messages for ever.
                self.redis.expire(to, int(seconds + QUEUE_TTL_MARGIN_S))
            except _REDIS_ERRORS as e:
                if result is not None:
                    self._forget(result)
                raise self._unavailable(e) from None
            return result  # expires: nobody waits for it after that, so a worker skips it

        pending = publish(queue, timeout)

        def resend():  # the worker it was routed to died: any worker of the model may take it now
            self._forget(publish(shared, max(1.0, deadline - time.monotonic())))  # `pending` waits on the id

        if supersede is not None:  # the task this one replaces stops on its worker
            self._redis(cancel.supersede, self.redis, supersede, pending.id)
        return pending, _Watch(name, pending.id, deadline, routed=routed, resend=resend)

    def queue_lengths(self, name: str, workers: Optional[list] = None) -> dict[str, int]:
        """Tasks waiting (no worker has taken them yet) in each queue of model `name`: its shared
        queue, then each live worker's own."""
        workers = self._workers(name) if workers is None else workers
        queues = [queue_name(name)] + [w["queue"] for w in workers if w.get("queue")]
        pipe = self.redis.pipeline(transaction=False)
        for queue in queues:
            pipe.llen(queue)
        return dict(zip(queues, (int(n) for n in self._redis(pipe.execute))))

    def _admit(self, name: str, shared: str, workers: list[dict], owner: Optional[dict]) -> str:
        """The queue to send to: the owner's own, or the shared one when there is no owner or its
        queue has a backlog. Busy when the model's waiting tasks (in all its queues) reach
        WWT_MAX_WAITING."""
        bound = self.max_waiting
        lengths = self.queue_lengths(name, workers)
        waiting = sum(lengths.values())
        if bound and waiting >= bound:
            are = "request is" if waiting == 1 else "requests are"
            raise Busy(f"busy: {waiting} {are} waiting for {name}; try again in a moment")
        if owner is None or lengths.get(owner["queue"], 0) >= affinity.BACKLOG:
            return shared
        return owner["queue"]

    def _forget(self, pending) -> None:
        """Drop a result this process no longer waits for: its subscription now, and its finaliser's
        second try (AsyncResult.__del__ unsubscribes again, and warns at exit when Redis has gone)."""
        backend, pending.backend = pending.backend, None
        if backend is None:
            return  # forgotten already
        try:
            backend.remove_pending_result(pending)
        except Exception:
            pass  # best effort: only bookkeeping of this process

    def _check_alive(self, watch: _Watch) -> None:
        """Between slices of a wait: NoWorker when the model has no live worker left, WorkerFailed when
        the worker that took the task died and its redelivery to another cannot come before the
        deadline. Either way the task is marked stale, so a late redelivered copy is skipped and the
        caller, who has been answered, is never answered twice."""
        name = watch.name
        live = self._redis(live_workers, self.redis, name)
        with self._lock:
            self._live[name] = (time.monotonic(), live)
        holder = self._redis(task_holder, self.redis, watch.task_id)
        node = holder.get("node") if holder else None
        if node in watch.gone:
            node = None  # the record of a dead worker, from before the task was sent again
        nodes = {w.get("node") for w in live}
        if not live:
            self._give_up(watch.task_id)
            if node:
                raise NoWorker(f"the worker serving {name} stopped (it may have crashed) before answering, and no "
                               f"other worker is serving {name}; start one with "
                               f"`wwt worker --model {self._spec(name)}`")
            raise NoWorker(f"no worker is serving {name} any more; start one with "
                           f"`wwt worker --model {self._spec(name)}`")
        if watch.routed is not None and watch.routed not in nodes:
            # Routed to one worker, which died: its own queue has no consumer now, and a task it had
            # taken would be restored to that queue. Any other worker of the model may take it.
            watch.gone.add(watch.routed)
            watch.routed = None
            watch.resend()
            return
        if not node or node in nodes:
            return  # still queued (the workers are busy), or its worker is alive and on it
        now = time.monotonic()
        seen = watch.first_seen.setdefault(node, now)
        try:
            redeliver_s = float(holder.get("redeliver_s", 0))
        except (TypeError, ValueError):
            redeliver_s = 0.0
        if redeliver_s > 0 and seen + redeliver_s + REDELIVERY_MARGIN_S < watch.deadline:
            # The broker hands the task to another worker before the deadline: wait for that.
            watch.note = ("; the worker that took it stopped (it may have crashed) and another "
                          "worker did not finish it in time")
            return
        self._give_up(watch.task_id)
        raise WorkerFailed(f"the worker serving {name} stopped (it may have crashed) while answering; "
                           f"try again")

    def _give_up(self, task_id: str) -> None:
        try:
            cancel.cancel_task(self.redis, task_id)
        except _REDIS_ERRORS:
            pass  # the task's expiry still keeps a late copy from running

    def _timed_out(self, watch: _Watch, limit: float) -> RequestTimeout:
        self._give_up(watch.task_id)
        name = watch.name
        return RequestTimeout(f"{name} did not answer within {limit:g} s{watch.note or '; the workers may be busy'} "
                              f"(start more with `wwt worker --model {self._spec(name)}`)")

    def _answer(self, kind: str, pending, name: str, timeout: float, started: float,
                watch: Optional[_Watch] = None, limit: Optional[float] = None):
        """Wait for a sent task's result, within `timeout`, and rebuild it as its result type.

        The wait is cut in slices of CHECK_EVERY_S; between slices the heartbeat registry says
        whether the model, and the worker that took the task, are still alive (_check_alive), so a
        dead worker ends the wait within a few heartbeats instead of at the timeout."""
        watch = watch or _Watch(name, pending.id, time.monotonic() + timeout)
        limit = timeout if limit is None else limit
        while True:
            left = watch.deadline - time.monotonic()
            if left <= 0:
                raise self._timed_out(watch, limit)
            try:
                value = pending.get(timeout=min(CHECK_EVERY_S, left), propagate=False)
                break
            except CeleryTimeout:
                pass
            except _REDIS_ERRORS as e:
                raise self._unavailable(e) from None
            except RuntimeError as e:  # Celery's result reader gave up reconnecting to Redis
                if isinstance(e.__cause__, _REDIS_ERRORS):
                    raise self._unavailable(e.__cause__) from None
                raise
            self._check_alive(watch)
        if pending.failed() or not isinstance(value, dict):
            raise WorkerFailed(f"the worker serving {name} failed the request: {value!r}")
        if "error" in value:
            raise error_from_dict(value["error"])
        result = RESULT_TYPES[kind].from_dict(value)
        elapsed = (time.perf_counter() - started) * 1000
        t = result.timings
        # The worker timed its own part; what is left of the round trip is queue and transport.
        t.queue_ms += max(0.0, elapsed - float(value.get("worker_ms", t.total_ms)))
        t.total_ms = elapsed
        t.worker = str(value.get("worker", ""))  # which worker answered
        return result

    # -- streaming ----------------------------------------------------------------------
    def stream(self, request: CompletionRequest, *, client: Optional[str] = None, supersede: Optional[str] = None,
               timeout: Optional[float] = None, partials: bool = True) -> EventStream:
        """The suggestion cache first (a hit is one done event at once, no task); else one task, whose
        partials the worker publishes on the task's Redis channel (workers/partials_channel.py) as
        they are decoded, then its result. `client` (else the supersede key) may have
        max_waiting_per_client requests in flight through this app; past that, or with max_waiting
        tasks already waiting in the model's queues, Busy at once and nothing is sent. Without
        `partials` no channel is opened and the worker publishes nothing. Cancelling the stream
        marks the task stale; its worker frees the slots at its next check."""
        def events():
            started = time.perf_counter()
            limit = self.timeout if timeout is None else timeout
            req = dataclasses.replace(request, model=request.model or self._default())
            if self.cache is not None and not req.fresh and not req.raw:
                hit = self._redis(self.cache.lookup, req)
                if hit is not None:
                    hit.timings.total_ms = (time.perf_counter() - started) * 1000
                    yield stream.done(hit)
                    return
            task_id = str(uuid.uuid4())
            # subscribe before the task can publish
            subscription = self._redis(Subscription, self.redis, task_id) if partials else None
            stream.on_cancel(lambda: self._redis(cancel.cancel_task, self.redis, task_id))
            try:
                with self.clients.hold(client if client is not None else supersede, req.model, supersede):
                    pending, watch = self._send("complete", req, limit, supersede, task_id=task_id,
                                                stream=partials)
                    try:
                        if subscription is not None:
                            yield from self._partials(subscription, pending, watch, limit, stream)
                        completion = self._answer("complete", pending, watch.name, limit, started, watch=watch,
                                                  limit=limit)
                    finally:
                        self._forget(pending)
            finally:
                if subscription is not None:
                    subscription.close()
            if self.cache is not None and not req.raw:  # raw answers follow other rules
                try:
                    self.cache.store(req, completion)
                except _REDIS_ERRORS:
                    pass  # the answer is good; only its caching failed
            yield stream.done(completion)

        stream = EventStream(events())
        return stream

    def _partials(self, subscription: Subscription, pending, watch: _Watch, limit: float, stream: EventStream):
        """Partial events from the task's channel until the worker says its answer is ready."""
        grow = GrowOnly()  # a task redelivered after a worker died starts again: never shrink a text
        checked = time.monotonic()
        while not stream.cancelled:
            left = watch.deadline - time.monotonic()
            if left <= 0:
                raise self._timed_out(watch, limit)
            message = self._redis(subscription.get, min(CHECK_EVERY_S, left))
            if message is not None and message.get("type") == "partial":
                yield partial_event(grow.apply(partials_of(message)))
            elif message is not None and message.get("type") == "end":
                return
            if time.monotonic() - checked >= CHECK_EVERY_S:  # quiet for a while: is anyone still on it?
                checked = time.monotonic()
                if self._redis(pending.ready):
                    return  # answered without a word on the channel (say, cancelled before it ran)
                self._check_alive(watch)
        raise Cancelled("the request was cancelled")

    # -- documents ----------------------------------------------------------------------
    def save_document(self, text: str, client: Optional[str] = None) -> tuple[str, str]:
        return self.documents.save(text, client)

    def delete_document(self, doc_id: str, delete_key: Optional[str]) -> None:
        return self.documents.delete(doc_id, delete_key)

    def load_document(self, doc_id: str) -> str:
        return self.documents.load(doc_id)

    # -- what operations read -----------------------------------------------------------
    def health(self) -> dict:
        out = {"ready": False, "backend": self.kind}
        try:
            default = out["model"] = self._default()
            workers = self._redis(live_workers, self.redis, default)
            out["workers"] = len(workers)
            out["ready"] = bool(workers)
            out["precision"] = (workers[0].get("precision") or None) if workers else None
            if not workers:
                out["reason"] = f"no worker is serving {default}"
        except Exception as e:  # never raises: not ready, and why (no addresses: anyone may read it)
            out["reason"] = caller_error(e, log, "health check").message
        return out

    def model_gauges(self) -> dict[str, dict]:
        gauges = {}
        for name in self.models():
            live = self._redis(live_workers, self.redis, name)
            gauges[name] = {"live_workers": len(live), "queue_depth": sum(self.queue_lengths(name, live).values())}
            for key in KV_GAUGES:  # summed over the live workers' last announcements
                if any(key in w for w in live):
                    gauges[name][key] = sum(int(w.get(key, 0)) for w in live)
        return gauges

    def security_warning(self, for_operator: bool = True) -> Optional[str]:
        return insecure_redis_warning(self.url, name_url=for_operator)

    # -- plumbing -----------------------------------------------------------------------
    def cache_stats(self) -> dict:
        return self._redis(self.cache.stats) if self.cache is not None else {}

    def _redis(self, fn, *args):
        try:
            return fn(*args)
        except _REDIS_ERRORS as e:
            raise self._unavailable(e) from None

    def _unavailable(self, e: Exception) -> BackendUnavailable:
        """The visitor hears that the queue is down; the operator (log, command line) hears where and why."""
        if isinstance(e, redis.exceptions.AuthenticationError) or "auth" in str(e).lower():
            return BackendUnavailable("the queue (Redis) refused the app's password; try again later",
                                      f"Redis at {redact(self.url)} refused the password: {e}")
        return BackendUnavailable("cannot reach Redis, the app's queue; try again in a moment",
                                  f"cannot reach Redis at {redact(self.url)} ({e}); is redis-server "
                                  f"running and WWT_REDIS_URL right?")

    def close(self) -> None:
        try:
            self.celery.close()
        finally:
            self.redis.close()
