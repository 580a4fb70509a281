"""`wwt serve`: build the backend, make sure the default model is there, launch the page.

The default model is loaded before the server starts, so a missing checkpoint (no
network, nothing cached) is reported at once, with what to do, instead of on the
first keystroke.
"""

from __future__ import annotations

import logging
import signal
import os
import sys
from typing import Optional

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no phoning home
# Gradio's queue keeps the last N calls for its /monitoring page and rebuilds a pandas table of all of
# them after every call (8 ms of CPU and ~4 MB at its default 10,000); 1,000 serve that page as well.
os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "1000")

from model import settings  # noqa: E402
from model.errors import WWTError  # noqa: E402

log = logging.getLogger(__name__)

HINT = ("To run without the Hub, point --model at a local folder with config.json and model.safetensors, "
        "e.g. `wwt make-tiny-model /tmp/tiny && wwt serve --model tiny=/tmp/tiny`.")


def setup_logging() -> None:
    """Our INFO lines (model loading) in the log, without every HTTP request Gradio makes to itself."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


def model_specs(given: Optional[list]) -> list[str]:
    """--model flags, else WWT_MODELS (comma-separated)."""
    return settings.model_specs(given)


def prepare_backend(kind: str, specs: list[str], redis_url: Optional[str] = None, device: Optional[str] = None,
                    dtype: Optional[str] = None):
    """The backend with its default model ready (embedded mode loads it now, download shown in the log)."""
    from .backends import make_backend

    backend = make_backend(kind, specs, redis_url=redis_url, device=device, dtype=dtype)
    loader = getattr(backend, "engine", None)
    if callable(loader):
        try:
            default = backend.default_model()
            log.info("loading %s", default)
            loader(default)
        except WWTError:
            backend.close()
            raise
    return backend


def build_app(backend):
    """The Gradio app with a queue that lets requests run side by side (the engine batches them).

    The queue holds at most WWT_QUEUE_MAX_SIZE calls: past it Gradio answers at once (HTTP 503,
    "busy: the server's queue is full ..." in our words, web/limits.py) instead of letting hundreds
    wait. The editor's server functions bypass this queue; the engine's waiting bounds
    (WWT_MAX_WAITING, WWT_MAX_WAITING_PER_CLIENT) cover them."""
    from .web.ui import build_ui

    demo = build_ui(backend)
    demo.queue(default_concurrency_limit=16, max_size=settings.get_int("WWT_QUEUE_MAX_SIZE", default=None) or None)
    return demo


def app_kwargs(backend) -> dict:
    """What `launch(app_kwargs=...)` gives Gradio's FastAPI app: our own routes (POST /wwt/stream,
    app/web/stream.py; GET /healthz and /metrics, app/web/ops.py), listed before Gradio's so none
    of its routes can shadow them."""
    from .web import ops
    from .web.stream import routes

    from .web import call_memory, limits

    # limits.py: the request-body limit in front of every route, a full queue's 503 in our words,
    # and DELETE /wwt/doc/{id}; call_memory.py: what Gradio keeps per call bounded, the heap trimmed
    return {"routes": routes(backend) + ops.routes(backend) + limits.routes(backend),
            "middleware": limits.middleware() + call_memory.middleware()}


def redis_warning(backend) -> Optional[str]:
    """The warning for a Redis used without a password on a non-loopback address (celery mode),
    with the address; the page shows it too, without the address (callbacks.model_status)."""
    from .web.callbacks import redis_warning as warning

    return warning(backend, name_url=True)


def _stop_like_ctrl_c(signum, frame) -> None:
    raise KeyboardInterrupt


def serve(args) -> int:
    setup_logging()
    specs = model_specs(getattr(args, "model", None))
    try:
        backend = prepare_backend(args.backend, specs, redis_url=getattr(args, "redis_url", None),
                                  device=getattr(args, "device", None), dtype=getattr(args, "dtype", None))
    except WWTError as e:
        print(f"error: {e.message}", file=sys.stderr)
        if args.backend == "local":
            print(HINT, file=sys.stderr)
        return 2
    from .web.ui import launch_kwargs

    warning = redis_warning(backend)
    if warning:
        log.warning(warning)
    demo = build_app(backend)
    print(f"Write With Transformer: {', '.join(backend.models())} on the {backend.kind} backend", flush=True)
    signal.signal(signal.SIGTERM, _stop_like_ctrl_c)  # a service manager's stop ends the server as Ctrl+C does
    try:
        demo.launch(server_name=args.host, server_port=args.port, show_error=False, quiet=False,
                    footer_links=["api"], app_kwargs=app_kwargs(backend), **launch_kwargs())
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass  # Ctrl+C or SIGTERM while starting up: stop as after a clean shutdown
    finally:
        backend.close()
    print("Write With Transformer: stopped", flush=True)
    return 0
