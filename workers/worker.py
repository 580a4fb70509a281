"""`wwt worker --model NAME_OR_SPEC`: load one model once, then serve its queue.

Why the threads pool: every task of this worker must reach the ONE engine of this process,
because the engine batches concurrent requests into one forward pass per step. Threads share
it. A prefork pool would give each child its own copy of the weights and KV cache (no
batching across children, N times the memory) and, worse, fork after CUDA is initialised:
a forked child cannot use the CUDA context made by its parent. So: one process, one engine,
`--concurrency` threads feeding it.

Why the model is loaded here, before the worker starts: Celery kills a `worker_process_init`
handler that blocks for more than a few seconds, and loading gpt2-xl takes longer. Loading
first also means a worker announces its model only once it can really answer.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

from model.errors import OPERATOR, WWTError
from model.network.known import parse_model_spec
from model.serving.engine_config import EngineConfig

from model import settings

from . import tasks
from .affinity import node_queue

from .queues import QueueConfig, insecure_redis_warning, queue_name, redact, redis_url

log = logging.getLogger("wwt.worker")


def node_name(model: str) -> str:
    """Unique per process, so several workers on one machine (or one queue) stay distinct."""
    return settings.get("WWT_WORKER_NAME") or f"{queue_name(model)}-{os.getpid()}@{socket.gethostname()}"


def load_engine(source: str, config, device=None, name=None, dtype=None):
    """`config`: the EngineConfig the worker built from the settings registry (and --slots)."""
    from model import Engine  # the engine module pulls in torch; import it only in a worker

    return Engine.from_pretrained(source, device=device, dtype=dtype, config=config, name=name)


def engine_info(engine, spec, device, concurrency: int) -> dict:
    """What the app can show about a served model without asking the worker."""
    info = {"source": spec.source, "device": str(getattr(engine, "device", device) or "cpu"),
            "dtype": str(getattr(engine, "dtype", "")).replace("torch.", ""),
            "concurrency": concurrency, "pid": os.getpid(), "host": socket.gethostname(),
            "heads": sorted({"lm", *getattr(engine, "extra_heads", {})})}
    config = getattr(engine, "config", None)
    for field in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size"):
        if hasattr(config, field):
            info[field] = getattr(config, field)
    info["precision"] = str(getattr(engine, "precision", "") or "")
    for key, get in (("parameters", lambda: config.parameter_count()), ("memory_bytes", engine.memory_bytes),
                     ("weight_bytes", lambda: engine.weight_bytes()),
                     ("rows", lambda: engine.rows), ("kv_tokens", lambda: engine.cache.tokens)):
        try:
            info[key] = int(get())
        except Exception:  # optional facts; a worker serves without them
            pass
    return info


def run_worker(args) -> int:
    """Load the model, then run a Celery worker on its queue until stopped. Returns an exit code."""
    import redis
    from celery import signals

    from .celery_app import make_app
    from .registry import Heartbeat

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(levelname)s %(name)s] %(message)s")
    # One line per task received and per result (with the suggestions' text) is noise and
    # puts people's writing into logs; failures are still logged.
    for noisy in ("celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    spec = parse_model_spec(args.model)
    url = redis_url(getattr(args, "redis_url", None))
    concurrency = max(1, int(getattr(args, "concurrency", None) or 8))
    device = getattr(args, "device", None)
    slots = getattr(args, "slots", None)
    try:
        queue_config = QueueConfig.from_settings()  # settings that contradict each other are caught here,
        app = make_app(url, queue_config)           # before a model is loaded
        # Built once, here: the engine reads no settings (model/serving/engine_config.py).
        engine_config = EngineConfig.from_settings()
        if slots:
            engine_config = engine_config.with_(slots=slots)
    except (WWTError, settings.SettingError) as e:
        print(f"error: {e.text_for(OPERATOR) if isinstance(e, WWTError) else e}", file=sys.stderr)
        return 2
    warning = insecure_redis_warning(url)
    if warning:
        log.warning(warning)
    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10)
    try:
        client.ping()
    except Exception as e:
        print(f"error: cannot reach Redis at {redact(url)}: {e}", file=sys.stderr)
        return 2

    log.info("loading %s from %s on %s", spec.name, spec.source, device or "the default device")
    try:
        engine = load_engine(spec.source, engine_config, device=device, name=spec.name,
                             dtype=spec.precision or getattr(args, "dtype", None))
    except WWTError as e:
        print(f"error: {e.text_for(OPERATOR)}", file=sys.stderr)
        return 2
    node = node_name(spec.name)
    own_queue = node_queue(spec.name, node)  # where a document routed to this worker waits (affinity.py)
    tasks.serve(spec.name, engine, redis_client=client, node=node)
    heartbeat = Heartbeat(client, spec.name, node,
                          {**engine_info(engine, spec, device, concurrency), "queue": own_queue},
                          interval=queue_config.heartbeat_s, ttl=queue_config.heartbeat_ttl_s,
                          live=getattr(engine, "kv_gauges", None))

    def on_ready(**_):
        heartbeat.start()
        log.info("serving %s on queue %s as %s", spec.name, queue_name(spec.name), node)

    def on_shutdown(**_):
        heartbeat.stop()

    signals.worker_ready.connect(on_ready, weak=False)
    signals.worker_shutdown.connect(on_shutdown, weak=False)
    try:
        app.worker_main([
            "worker",
            "--pool=threads",               # one engine shared by all tasks; see the module docstring
            f"--concurrency={concurrency}",  # requests in flight at once = what the engine can batch
            f"--queues={queue_name(spec.name)},{own_queue}",  # the model's shared queue, then its own
            f"--hostname={node}",
            "--without-gossip", "--without-mingle",  # workers need not know each other; start faster
            "--loglevel=INFO",
        ])
    finally:
        heartbeat.stop()
        close = getattr(engine, "close", None)
        if callable(close):
            close()
    return 0
