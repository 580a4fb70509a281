"""The model family by short name, and how a model name maps to where it comes from."""

from __future__ import annotations

import os
from dataclasses import dataclass

# Short names people type -> the Hub repos that hold the weights.
KNOWN_MODELS = {
    "distilgpt2": "distilbert/distilgpt2",
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "openai-gpt": "openai-community/openai-gpt",
}

# Architecture of each known size (config.json values), so sizes are known without a download.
KNOWN_SHAPES = {
    "distilgpt2": dict(n_layer=6, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16, n_positions=1024, vocab_size=50257),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20, n_positions=1024, vocab_size=50257),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25, n_positions=1024, vocab_size=50257),
    "openai-gpt": dict(n_layer=12, n_embd=768, n_head=12, n_positions=512, vocab_size=40478),
}


@dataclass(frozen=True)
class ModelSpec:
    """A served model: the name people and queues use, and where its weights come from."""

    name: str
    source: str  # short name, Hub repo id, or local folder


def parse_model_spec(spec: str) -> ModelSpec:
    """`gpt2`, `org/repo`, `/path/to/folder` or `name=source`."""
    spec = spec.strip()
    if "=" in spec:
        name, source = spec.split("=", 1)
        return ModelSpec(name.strip(), source.strip())
    if os.path.isdir(spec):
        return ModelSpec(os.path.basename(os.path.normpath(spec)) or spec, spec)
    return ModelSpec(spec, spec)
