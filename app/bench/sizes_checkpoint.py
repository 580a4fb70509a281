"""Random checkpoints at the real GPT-2 shapes, for the sizes report (`wwt bench --sizes`).

Written tensor by tensor from the Hub's key names and shapes, never through `transformers`'
model: building GPT2LMHeadModel for gpt2-xl and saving it holds two copies of its 6.2 GB of
weights, where this holds one (the dict `save_file` writes). The names and shapes come from our
own network built on the meta device, which allocates nothing, so they are exactly what
model/network/weights.py expects to load. Values are deterministic (one seeded torch.Generator,
tensors drawn in model order): randn * 0.02 for matrices and embeddings, LayerNorm weights 1,
every bias 0, float32. The tokenizer is the byte-level one of `wwt bench` (speed.py) at the
model's vocabulary size, and config.json names no bos/eos token, so every run decodes its budget.
"""

from __future__ import annotations

import json
from pathlib import Path

# The sizes `wwt bench --sizes` knows, smallest first (their shapes: model/network/known.py).
SIZES = ("distilgpt2", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
FINISHED = "complete"  # written last: a folder without it was interrupted and is written again
SEED = 0


def real_shape(size: str) -> dict:
    """n_layer, n_embd, n_head, n_positions and vocab_size of a known size (config.json values)."""
    from model.network.known import KNOWN_SHAPES

    return dict(KNOWN_SHAPES[size])


def hub_config(shape: dict) -> dict:
    """config.json for a GPT-2 of `shape`, as the Hub's GPT-2 configs spell it, with no bos/eos token."""
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5, "n_inner": None, "bos_token_id": None, "eos_token_id": None,
            "tie_word_embeddings": True, **shape}


def random_tensors(config: dict, seed: int = SEED) -> dict:
    """The checkpoint's tensors under the Hub's GPT-2 names (no `transformer.` prefix, Conv1D [in, out])."""
    import torch

    from model.network.config import GPTConfig
    from model.network.gpt import GPTWithHead

    with torch.device("meta"):  # names and shapes only: nothing is allocated
        layout = GPTWithHead(GPTConfig.from_dict(config), "lm")
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, p in layout.named_parameters():
        key = name[len("transformer."):] if name.startswith("transformer.") else name
        if ".ln_" in f".{key}" and key.endswith(".weight"):
            tensors[key] = torch.ones(p.shape)
        elif key.endswith(".bias"):
            tensors[key] = torch.zeros(p.shape)
        else:
            tensors[key] = torch.randn(p.shape, generator=gen).mul_(0.02)
    return tensors


def write_random_checkpoint(folder: Path, shape: dict, seed: int = SEED) -> Path:
    """config.json, model.safetensors (one file) and the tokenizer files for a random GPT-2 of `shape`."""
    from safetensors.torch import save_file

    from .speed import synthetic_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FINISHED).unlink(missing_ok=True)
    config = hub_config(shape)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = random_tensors(config, seed)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    synthetic_tokenizer(folder, vocab_size=shape["vocab_size"])
    (folder / FINISHED).write_text(json.dumps({"seed": seed, **shape}) + "\n")
    return folder


def random_checkpoint(parent: Path, name: str, shape: dict, seed: int = SEED) -> Path:
    """The random checkpoint of `shape` under `parent`, written unless a finished one of the same shape
    and seed is there already (`--cache-dir` keeps them across runs)."""
    folder = Path(parent) / f"{name}-random-seed{seed}"
    marker = folder / FINISHED
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == {"seed": seed, **shape}:
                return folder
        except ValueError:
            pass
    return write_random_checkpoint(folder, shape, seed)

