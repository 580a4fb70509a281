"""The backends the UI, the APIs and the CLI talk to, one interface (`base.Backend`):

- `local.LocalBackend`: engines in this process (the default; no services needed);
- `celery.CeleryBackend`: requests through Redis to Celery workers (`workers/`);
- `documents`: shared documents, in a folder (local) or in Redis (celery).

`make_backend` builds one from the app's configuration; each is imported only when chosen, so
the web app never loads Celery it does not use, nor torch before it needs it.
"""

from __future__ import annotations

from model.errors import UnknownModel

from .base import Backend

__all__ = ["Backend", "make_backend"]


def make_backend(config) -> Backend:
    """`config` (app/app_config.py's AppConfig): `local` runs the engines here; `celery` sends requests
    through Redis to workers."""
    if config.backend == "local":
        from .documents import FileDocumentStore, ShareRateLimiter
        from .local import LocalBackend

        documents = FileDocumentStore(config.documents_dir, max_bytes=config.documents_max_bytes,
                                      limiter=ShareRateLimiter(config.share_limit, config.share_window_s))
        return LocalBackend(list(config.models), device=config.device, dtype=config.dtype,
                            engine_config=config.engine, memory_budget_gb=config.memory_budget_gb,
                            request_timeout=config.request_timeout, documents=documents)
    if config.backend == "celery":
        from .celery import CeleryBackend

        return CeleryBackend(list(config.models), redis_url=config.redis_url, timeout=config.request_timeout,
                             affinity=config.affinity, max_waiting=config.engine.max_waiting,
                             max_waiting_per_client=config.engine.max_waiting_per_client,
                             cache_ttl_s=config.cache_ttl_s, cache_max_entries=config.cache_max_entries,
                             documents={"max_bytes": config.documents_max_bytes, "limit": config.share_limit,
                                        "window_s": config.share_window_s},
                             queue=config.queue)
    raise UnknownModel(f"unknown backend {config.backend!r}: use local or celery")
