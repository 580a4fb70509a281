"""The backends the UI and the CLI talk to, one interface (`base.Backend`):

- `local.LocalBackend`: engines in this process (the default; no services needed);
- `celery.CeleryBackend`: requests through Redis to Celery workers (`workers/`);
- `documents`: shared documents, in a folder (local) or in Redis (celery).

`make_backend` picks one; each is imported only when chosen, so the web app never loads
Celery it does not use, nor torch before it needs it.
"""

from __future__ import annotations

from typing import Optional

from model import settings
from model.errors import UnknownModel

from .base import Backend

__all__ = ["Backend", "make_backend"]


def make_backend(kind: str, models: list[str], redis_url: Optional[str] = None, device: Optional[str] = None,
                 dtype: Optional[str] = None, **kwargs) -> Backend:
    """`local` runs the engines here; `celery` sends requests through Redis to workers."""
    models = settings.model_specs(models)
    if kind == "local":
        from .local import LocalBackend

        slots = kwargs.pop("slots", None) or settings.get_int("WWT_SLOTS", default=None)
        return LocalBackend(models, device=device, slots=slots, dtype=dtype, **kwargs)
    if kind == "celery":
        from .celery import CeleryBackend

        return CeleryBackend(models, redis_url=redis_url or settings.get("WWT_REDIS_URL"), **kwargs)
    raise UnknownModel(f"unknown backend {kind!r}: use local or celery")
