"""The model family by short name, and how a model name maps to where it comes from."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

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


# The precisions a spec may name after "@" (model/serving/quantize.py holds what each means).
PRECISIONS = ("float32", "bfloat16", "float16", "int8", "int4", "nf4")
PRECISION_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
                     "8bit": "int8", "4bit": "int4"}


@dataclass(frozen=True)
class ModelSpec:
    """A served model: the name people and queues use, where its weights come from, and in what precision."""

    name: str
    source: str  # short name, Hub repo id, or local folder
    precision: Optional[str] = None  # None: the device's default (float32 on CPU, float16 on CUDA)


def split_precision(spec: str) -> tuple[str, Optional[str]]:
    """`gpt2@int8` -> ("gpt2", "int8"); a spec without a known precision after its last "@" is left whole."""
    head, at, tail = spec.rpartition("@")
    if not at:
        return spec, None
    name = PRECISION_ALIASES.get(tail.strip().lower(), tail.strip().lower())
    return (head, name) if name in PRECISIONS else (spec, None)


def parse_model_spec(spec: str) -> ModelSpec:
    """`gpt2`, `org/repo`, `/path/to/folder` or `name=source`, each optionally followed by `@precision`.

    `gpt2@int8` is served as "gpt2@int8" (so the same model at two precisions has two names);
    `tiny=./tiny@int8` keeps the name it was given, "tiny".
    """
    spec, precision = split_precision(spec.strip())
    spec = spec.strip()
    if "=" in spec:
        name, source = spec.split("=", 1)
        return ModelSpec(name.strip(), source.strip(), precision)
    suffix = f"@{precision}" if precision else ""
    if os.path.isdir(spec):
        return ModelSpec((os.path.basename(os.path.normpath(spec)) or spec) + suffix, spec, precision)
    return ModelSpec(spec + suffix, spec, precision)
