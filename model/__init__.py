"""The GPT-2 / OpenAI GPT family in plain PyTorch.

- `model.network`: the transformer and its heads, config, weights, tokenizer, known models.
- `model.serving`: the engine that serves it (scheduling, KV-cache slots, autocomplete
  rules, sampling, CPU kernels, the fixed-shape decode step).
- `model.types`, `model.errors`, `model.contract`, `model.settings`: what crosses the queue
  and what every caller agrees on. They import no torch, so the app and the workers can
  use them without loading the engine.

Names below are imported on first use, so `import model` stays light.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "Engine": "model.serving.engine",
    "GPTBody": "model.network.gpt",
    "GPTWithHead": "model.network.gpt",
    "HEADS": "model.network.gpt",
    "GPTConfig": "model.network.config",
    "GPTTokenizer": "model.network.tokenizer",
    "load_tokenizer": "model.network.tokenizer",
    "KNOWN_MODELS": "model.network.known",
    "ModelSpec": "model.network.known",
    "parse_model_spec": "model.network.known",
    "load": "model.serving.loading",
    "resolve_checkpoint": "model.network.weights",
    "KVCache": "model.serving.kv_cache",
    "BadRequest": "model.errors",
    "CheckpointError": "model.errors",
    "UnknownModel": "model.errors",
    "WWTError": "model.errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
