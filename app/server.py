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

from model.errors import OPERATOR, WWTError  # noqa: E402

from .app_config import AppConfig  # noqa: E402

log = logging.getLogger(__name__)

HINT = ("To run without the Hub, point --model at a local folder with config.json and model.safetensors, "
        "e.g. `wwt make-tiny-model /tmp/tiny && wwt serve --model tiny=/tmp/tiny`.")


def setup_logging() -> None:
    """Our INFO lines (model loading) in the log, without every HTTP request Gradio makes to itself."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


def prepare_backend(config: AppConfig):
    """The backend with its default model ready (embedded mode loads it now, download shown in the log)."""
    from .backends import make_backend

    backend = make_backend(config)
    try:
        default = backend.default_model()
        log.info("preparing %s", default)
        backend.prepare(default)
    except WWTError:
        backend.close()
        raise
    return backend


def build_app(backend, config: Optional[AppConfig] = None):
    """The Gradio app with a queue that lets requests run side by side (the engine batches them).

    The queue holds at most `config.queue_max_size` calls: past it Gradio answers at once (HTTP 503,
    "busy: the server's queue is full ..." in our words, web/limits.py) instead of letting hundreds
    wait. The editor's server functions bypass this queue; the engine's waiting bounds cover them."""
    from .web.ui import build_ui

    demo = build_ui(backend)
    config = config or AppConfig()
    # api_open=False: the named endpoints answer through the queue only (no direct POST to
    # /gradio_api/api/<name> or /run/<name>), so the queue's bound covers every call
    demo.queue(default_concurrency_limit=16, max_size=config.queue_max_size, api_open=False)
    return demo


def app_kwargs(backend, config: Optional[AppConfig] = None) -> dict:
    """What `launch(app_kwargs=...)` gives Gradio's FastAPI app: our own routes (POST /wwt/stream,
    app/web/stream.py; GET /healthz and /metrics, app/web/ops.py), listed before Gradio's so none
    of its routes can shadow them."""
    from starlette.middleware import Middleware

    from starlette.middleware.cors import CORSMiddleware

    from .web import call_memory, limits, openai_api, ops, shared_docs
    from .web.client_identity import ClientIdentity, TrustedProxies, keep_the_real_peer
    from .web.stream import StreamCount, routes

    config = config or AppConfig()
    keep_the_real_peer()  # ClientIdentity decides who the client is; uvicorn must not rewrite it first

    # client_identity.py: who the client is, decided once, first; limits.py: the request-body limit in
    # front of every route and a full queue's 503 in our words; call_memory.py: what Gradio keeps per
    # call bounded, the heap trimmed; shared_docs.py: the shared-document routes
    identity = Middleware(ClientIdentity, trusted=TrustedProxies(config.trusted_proxies))
    # Cross-origin calls only from the pages listed in WWT_CORS_ORIGINS (none by default), by Starlette's
    # own middleware; Gradio's, which on a public host reflects any origin, stands aside (defer_gradio_cors).
    defer_gradio_cors()
    cors = Middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST", "DELETE"],
                      allow_headers=["authorization", "content-type"], max_age=600)
    streams = StreamCount()  # /wwt/stream and streamed /v1/completions share one bound
    return {"routes": routes(backend, streams) + openai_api.routes(backend, config, streams) + ops.routes(backend)
            + shared_docs.routes(backend),
            "middleware": [cors, identity] + limits.middleware(config.max_body_bytes) + call_memory.middleware()}


def defer_gradio_cors() -> None:
    """Gradio's CORS middleware allows any origin once the Host is not localhost (so on every public
    deployment, credentials included). It stands aside when the app configures CORS itself, but it
    only looks for that on a parent app (gr.mount_gradio_app); this tells it that our app does."""
    from gradio.route_utils import CustomCORSMiddleware

    CustomCORSMiddleware.parent_configures_cors = lambda self: True


def _stop_like_ctrl_c(signum, frame) -> None:
    raise KeyboardInterrupt


def serve(args) -> int:
    setup_logging()
    try:
        config = AppConfig.from_settings(getattr(args, "model", None), backend=args.backend,
                                         redis_url=getattr(args, "redis_url", None),
                                         device=getattr(args, "device", None), dtype=getattr(args, "dtype", None))
        backend = prepare_backend(config)
    except WWTError as e:
        print(f"error: {e.text_for(OPERATOR)}", file=sys.stderr)
        if args.backend == "local":
            print(HINT, file=sys.stderr)
        return 2
    from .web.ui import launch_kwargs

    warning = backend.security_warning(for_operator=True)
    if warning:
        log.warning(warning)
    demo = build_app(backend, config)
    print(f"Write With Transformer: {', '.join(backend.models())} on the {backend.kind} backend", flush=True)
    signal.signal(signal.SIGTERM, _stop_like_ctrl_c)  # a service manager's stop ends the server as Ctrl+C does
    try:
        demo.launch(server_name=args.host, server_port=args.port, show_error=False, quiet=False,
                    footer_links=["api"], app_kwargs=app_kwargs(backend, config), **launch_kwargs(config.session_capacity, config.mcp))
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass  # Ctrl+C or SIGTERM while starting up: stop as after a clean shutdown
    finally:
        backend.close()
    print("Write With Transformer: stopped", flush=True)
    return 0
