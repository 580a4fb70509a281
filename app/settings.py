"""Settings from flags or the environment, in one place, so the README's table stays true."""

from __future__ import annotations

import os

ENV = {
    "WWT_BACKEND": ("local", "local (engine in this process) or celery (Redis queue and workers)"),
    "WWT_REDIS_URL": ("redis://localhost:6379/0", "Redis for the Celery broker, results, suggestion cache and documents"),
    "WWT_MODELS": ("gpt2", "comma-separated models the app offers (short name, Hub id, folder, or name=source)"),
    "WWT_DEVICE": ("", "cpu, cuda or cuda:N; empty picks CUDA when present"),
    "WWT_SLOTS": ("", "KV-cache slots per engine (sequences held at once); empty picks by device"),
    "WWT_CONCURRENCY": ("8", "celery worker: tasks run at once, all batched by its one engine"),
    "WWT_MEMORY_BUDGET_GB": ("8", "embedded mode: unload the least recently used model beyond this much"),
    "WWT_REQUEST_TIMEOUT": ("60", "seconds the app waits for any answer before it gives up"),
    "WWT_DATA_DIR": ("~/.cache/write-with-transformer", "embedded mode: where shared documents are kept"),
    "HF_HUB_OFFLINE": ("", "1: never reach the Hub, use only cached or local weights"),
    "HF_HOME": ("~/.cache/huggingface", "where downloaded weights are cached"),
}


def env(name: str) -> str:
    return os.environ.get(name, ENV[name][0])


def env_float(name: str) -> float:
    return float(env(name))
