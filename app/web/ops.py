"""GET /healthz and GET /metrics: what an operator, a load balancer and Prometheus read.

/healthz is 200 with {"ready": true, ...} when the default model can answer now: loaded in
this process (embedded backend) or served by at least one live worker (celery backend, from
the heartbeat registry); 503 with {"ready": false, "reason": ...} otherwise (Redis down, no
worker, model not loaded yet). It runs no model.

/metrics is the Prometheus text format (prometheus_client), one registry per process:

    wwt_requests_total{endpoint,model}              requests that reached the app
    wwt_errors_total{endpoint,model,kind}           requests that failed on our side (timeout, no worker...)
    wwt_refusals_total{endpoint,model,kind}         requests refused: bad input, unknown model, busy, a limit
    wwt_request_duration_seconds{endpoint,model}    latency histogram, every outcome
    wwt_suggestion_cache_hits_total{kind}           suggestion-cache hits (celery mode; shared by the app's
                                                    processes, read from Redis), kind = exact | incremental
    wwt_suggestion_cache_misses_total
    wwt_queue_depth{model}                          requests waiting: the model's Redis queues' lengths
                                                    (celery) or the engine's waiting list (embedded)
    wwt_live_workers{model}                         workers announcing the model now (celery)
    wwt_model_loaded{model}                         1 when the engine is in memory (embedded)
    wwt_kv_tokens_used{model}, wwt_kv_tokens_free{model}
                                                    KV-cache positions held and free (embedded: the engine;
                                                    celery: summed over live workers' last heartbeats)
    wwt_kv_evictions_total{model}                   documents evicted from a full KV cache
    wwt_prompt_tokens_reused_total{model}, wwt_prompt_tokens_prefilled_total{model}
                                                    prompt tokens found in the cache, and computed
    wwt_kv_reuse_ratio{model}                       reused / (reused + prefilled) since the engine started
    wwt_ready                                       what /healthz says, as 1 or 0
    wwt_backend_up                                  0 when Redis could not be read for this scrape

`model` is always one of the offered names, "-" when a request named none that is offered
(so a caller cannot grow the label set, or the page, with names of its own).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from model.errors import WWTError

log = logging.getLogger(__name__)

HEALTH_PATH = "/healthz"
METRICS_PATH = "/metrics"

# Errors that say the caller asked for something we will not do; the rest are our failures.
# A request cancelled (the reader hung up, a newer keystroke replaced it) is neither.
REFUSAL_KINDS = {"bad_request", "unknown_model", "busy", "not_found", "forbidden", "limit"}
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

REGISTRY = CollectorRegistry(auto_describe=True)
REQUESTS = Counter("wwt_requests", "Requests that reached the app", ["endpoint", "model"], registry=REGISTRY)
ERRORS = Counter("wwt_errors", "Requests that failed on the server's side", ["endpoint", "model", "kind"],
                 registry=REGISTRY)
REFUSALS = Counter("wwt_refusals", "Requests refused: bad input, unknown model, busy",
                   ["endpoint", "model", "kind"], registry=REGISTRY)
LATENCY = Histogram("wwt_request_duration_seconds", "Time from request to answer (or error)",
                    ["endpoint", "model"], buckets=BUCKETS, registry=REGISTRY)


def model_label(backend, name) -> str:
    """An offered model's name, the default for an empty one, "-" for anything else."""
    try:
        if not name:
            return backend.default_model()
        if isinstance(name, str) and len(name) <= 200 and name in backend.models():
            return name
    except Exception:
        pass
    return "-"


def record(endpoint: str, model: str, started: float, kind: Optional[str] = None) -> None:
    """One finished request: counted, timed, and its failure (if `kind`) sorted as refusal or error."""
    REQUESTS.labels(endpoint, model).inc()
    LATENCY.labels(endpoint, model).observe(max(0.0, time.perf_counter() - started))
    if kind is not None and kind != "cancelled":
        (REFUSALS if kind in REFUSAL_KINDS else ERRORS).labels(endpoint, model, kind).inc()


@contextlib.contextmanager
def observe(endpoint: str, backend, model):
    """Count and time the block; an exception is sorted by its kind and raised again."""
    label = model_label(backend, model)
    started = time.perf_counter()
    try:
        yield
    except WWTError as e:
        record(endpoint, label, started, e.kind)
        raise
    except Exception:
        record(endpoint, label, started, "internal")
        raise
    record(endpoint, label, started)


# -- what is read at scrape time -----------------------------------------------------------

class BackendCollector:
    """Gauges read from the backend when /metrics is scraped: readiness, queues, workers, cache
    (Backend.health, model_gauges and cache_stats; no backend internals)."""

    def __init__(self, backend):
        self.backend = backend

    def describe(self):
        return []

    def collect(self):
        backend = self.backend
        up = GaugeMetricFamily("wwt_backend_up", "1 when the backend's state could be read for this scrape")
        ready = GaugeMetricFamily("wwt_ready", "1 when the default model can answer now (/healthz)")
        depth = GaugeMetricFamily("wwt_queue_depth", "Requests waiting for the model", labels=["model"])
        loaded = GaugeMetricFamily("wwt_model_loaded", "1 when the model's engine is in memory", labels=["model"])
        workers = GaugeMetricFamily("wwt_live_workers", "Workers announcing the model now", labels=["model"])
        ok, families = 1, []
        try:
            ready.add_metric([], 1 if backend.health()["ready"] else 0)
            per_model = backend.model_gauges()
            for name, gauges in per_model.items():
                depth.add_metric([name], gauges.get("queue_depth", 0))
                if "loaded" in gauges:
                    loaded.add_metric([name], gauges["loaded"])
                if "live_workers" in gauges:
                    workers.add_metric([name], gauges["live_workers"])
            families = [f for f in (loaded, workers) if f.samples] + kv_families(per_model)
            stats = backend.cache_stats()
            if stats:
                hits = CounterMetricFamily("wwt_suggestion_cache_hits", "Suggestion-cache hits (all app processes)",
                                           labels=["kind"])
                hits.add_metric(["exact"], stats.get("hits", 0))
                hits.add_metric(["incremental"], stats.get("incremental_hits", 0))
                families += [hits, CounterMetricFamily("wwt_suggestion_cache_misses",
                                                       "Suggestion-cache misses (all app processes)",
                                                       value=stats.get("misses", 0))]
        except Exception as e:
            log.warning("metrics: cannot read the backend: %s", e)
            ok = 0
        up.add_metric([], ok)
        yield from families
        yield up
        yield ready
        yield depth


def kv_families(gauges: dict[str, dict]) -> list:
    """The KV-cache families, for the models whose engines report them (Engine.kv_gauges)."""
    used = GaugeMetricFamily("wwt_kv_tokens_used", "KV-cache positions held", labels=["model"])
    free = GaugeMetricFamily("wwt_kv_tokens_free", "KV-cache positions free", labels=["model"])
    evictions = CounterMetricFamily("wwt_kv_evictions", "Documents evicted from a full KV cache", labels=["model"])
    reused = CounterMetricFamily("wwt_prompt_tokens_reused", "Prompt tokens found in the KV cache", labels=["model"])
    prefilled = CounterMetricFamily("wwt_prompt_tokens_prefilled", "Prompt tokens computed", labels=["model"])
    ratio = GaugeMetricFamily("wwt_kv_reuse_ratio", "Prompt tokens reused / (reused + prefilled)", labels=["model"])
    for name, g in gauges.items():
        if "kv_tokens_used" not in g:
            continue
        used.add_metric([name], g["kv_tokens_used"])
        free.add_metric([name], g["kv_tokens_free"])
        evictions.add_metric([name], g["kv_evictions"])
        reused.add_metric([name], g["tokens_reused"])
        prefilled.add_metric([name], g["tokens_prefilled"])
        total = g["tokens_reused"] + g["tokens_prefilled"]
        ratio.add_metric([name], g["tokens_reused"] / total if total else 0.0)
    return [f for f in (used, free, evictions, reused, prefilled, ratio) if f.samples]


def metrics_text(backend) -> bytes:
    """This process's counters and the backend's state, in the Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Forward(REGISTRY))
    registry.register(BackendCollector(backend))
    return generate_latest(registry)


class _Forward:
    """The process-wide counters, inside a per-scrape registry next to the backend's gauges."""

    def __init__(self, registry):
        self.registry = registry

    def collect(self):
        return self.registry.collect()


def routes(backend) -> list:
    """GET /healthz and GET /metrics (server.app_kwargs mounts them with the streaming route)."""
    async def healthz(request: Request):
        import asyncio

        state = await asyncio.to_thread(backend.health)
        return JSONResponse(state, status_code=200 if state["ready"] else 503, headers={"Cache-Control": "no-store"})

    async def metrics(request: Request):
        import asyncio

        body = await asyncio.to_thread(metrics_text, backend)
        return Response(body, media_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})

    return [Route(HEALTH_PATH, healthz, methods=["GET"]), Route(METRICS_PATH, metrics, methods=["GET"])]
