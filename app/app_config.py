"""The app's configuration, built once at an entry point (`wwt serve`, `wwt complete`, the Spaces
entry `app.py`) from the settings registry and passed down as this one value.

Nothing under app/ reads the environment after that: backends, the page, the limits and the
document stores take the fields they need. Tests build an AppConfig directly. The defaults are
the registry's defaults; `from_settings` reads the variables (model/settings.py says what each means).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from model import settings
from model.serving.engine_config import EngineConfig


@dataclass(frozen=True)
class AppConfig:
    backend: str = "local"                       # local | celery
    models: tuple[str, ...] = ("gpt2",)          # offered, the default first
    redis_url: str = "redis://localhost:6379/0"
    device: Optional[str] = None                 # None: CUDA when present
    dtype: Optional[str] = None                  # precision of specs that name none
    engine: EngineConfig = field(default_factory=EngineConfig)
    memory_budget_gb: float = 8.0                # embedded: unload the least recently used past it
    request_timeout: float = 60.0
    data_dir: str = "~/.cache/write-with-transformer"
    share_limit: int = 10                        # shares per client per window; 0: no limit
    share_window_s: float = 600.0
    documents_max_mb: float = 200.0
    max_body_mb: float = 7.0
    session_capacity: int = 200
    queue_max_size: Optional[int] = 64           # the Gradio queue; None: no bound
    trusted_proxies: str = "127.0.0.1,::1"       # whose forwarded client address is believed
    affinity: bool = True                        # celery: route a document to the worker holding it
    api_key: str = ""                            # /v1/* requires this bearer key; empty: open
    cors_origins: tuple[str, ...] = ()           # origins whose pages may call /v1/* from a browser
    max_prompts: int = 16                        # prompts of one /v1/completions call
    mcp: bool = True                             # the named endpoints as MCP tools
    cache_ttl_s: float = 3600.0                  # celery: the suggestion cache
    cache_max_entries: int = 20000
    queue: Optional[object] = None               # celery: workers.queues.QueueConfig (None: its defaults)

    @classmethod
    def from_settings(cls, models: Optional[list] = None, **given) -> "AppConfig":
        """The registry's values; `models` (say, --model flags) instead of WWT_MODELS, and `given`
        (flags such as backend, redis_url, device, dtype) where they are not None. A value that
        cannot be used is a SettingError, or QueueMisconfigured (a WWTError), naming the variable."""
        config = cls(
            backend=settings.get("WWT_BACKEND"),
            models=tuple(settings.model_specs(models)),
            redis_url=settings.get("WWT_REDIS_URL"),
            device=settings.get("WWT_DEVICE").strip() or None,
            dtype=settings.get("WWT_DTYPE").strip() or None,
            engine=EngineConfig.from_settings(),
            memory_budget_gb=settings.get_float("WWT_MEMORY_BUDGET_GB"),
            request_timeout=settings.get_float("WWT_REQUEST_TIMEOUT"),
            data_dir=settings.get("WWT_DATA_DIR"),
            share_limit=settings.get_int("WWT_SHARE_LIMIT"),
            share_window_s=settings.get_float("WWT_SHARE_WINDOW_S"),
            documents_max_mb=settings.get_float("WWT_DOCUMENTS_MAX_MB"),
            max_body_mb=settings.get_float("WWT_MAX_BODY_MB"),
            session_capacity=max(1, settings.get_int("WWT_SESSION_CAPACITY")),
            queue_max_size=settings.get_int("WWT_QUEUE_MAX_SIZE", default=None) or None,
            trusted_proxies=_trusted_proxies(),
            affinity=settings.get_bool("WWT_AFFINITY"),
            api_key=settings.get("WWT_API_KEY").strip(),
            cors_origins=tuple(o.strip().rstrip("/") for o in settings.get("WWT_CORS_ORIGINS").split(",") if o.strip()),
            max_prompts=max(1, settings.get_int("WWT_MAX_PROMPTS")),
            mcp=settings.get_bool("WWT_MCP"),
            cache_ttl_s=settings.get_float("WWT_CACHE_TTL_S"),
            cache_max_entries=settings.get_int("WWT_CACHE_MAX_ENTRIES"),
        )
        config = config.with_(**{k: v for k, v in given.items() if v is not None})
        if config.backend == "celery":  # the time limits the app's Celery client shares with the workers
            from workers.queues import QueueConfig

            config = config.with_(queue=QueueConfig.from_settings())
        return config

    def with_(self, **changes) -> "AppConfig":
        return replace(self, **changes)

    @property
    def documents_dir(self) -> Path:
        return Path(self.data_dir).expanduser() / "documents"

    @property
    def documents_max_bytes(self) -> int:
        return int(self.documents_max_mb * 1_000_000)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1_000_000)


def _trusted_proxies() -> str:
    """WWT_TRUSTED_PROXIES, checked; empty: loopback, and on Spaces its proxy's ranges."""
    from .web.client_identity import TrustedProxies, default_proxies

    spec = settings.get("WWT_TRUSTED_PROXIES").strip() or default_proxies(bool(settings.get("SPACE_ID").strip()))
    try:
        TrustedProxies(spec)
    except ValueError as e:
        raise settings.SettingError(str(e)) from None
    return spec
