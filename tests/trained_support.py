"""A small GPT-2 trained for a few seconds inside the tests, so its next-token distributions are peaked.

Random weights give nearly flat distributions, which hide quantization error. The text is
English the machine already has: the docstrings of the Python standard library. The checkpoint
is saved in the Hub's layout (config.json, model.safetensors with Hub key names, tokenizer.json)
and loaded back through the same code a user's download takes.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model.network.config import GPTConfig
from model.network.gpt import GPTWithHead

MODULES = ["argparse", "collections", "json", "pathlib", "subprocess", "threading", "logging", "email.message",
           "http.client", "unittest.case", "dataclasses", "functools", "itertools", "re", "shutil",
           "tarfile", "zipfile", "socket", "urllib.request", "csv", "decimal", "fractions", "statistics", "random",
           "datetime", "calendar", "textwrap", "string", "difflib", "heapq", "queue", "tempfile", "configparser",
           "pickle", "copy", "enum", "contextlib", "inspect", "ast", "doctest", "timeit"]
EOS = "<|endoftext|>"
LR = 1e-2


def english_text() -> str:
    """About a quarter of a megabyte of English: standard-library docstrings, in a fixed order."""
    docs = []
    for name in MODULES:
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "") == module.__name__:
                doc = inspect.getdoc(obj)
                if doc:
                    docs.append(" ".join(doc.split()))
    return "\n".join(docs)


def train_small_gpt2(folder: Path, steps: int = 400, seed: int = 0) -> dict:
    """Train and save; returns {"folder", "held_out" (token ids), "train_loss", "held_out_loss"}."""
    torch.manual_seed(seed)
    text = english_text()
    cut = int(len(text) * 0.9)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text[:cut]], trainers.BpeTrainer(vocab_size=512, special_tokens=[EOS], show_progress=False,
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    raw = {"model_type": "gpt2", "vocab_size": tok.get_vocab_size(), "n_positions": 128, "n_embd": 128,
           "n_layer": 2, "n_head": 4, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
           "bos_token_id": eos, "eos_token_id": eos, "architectures": ["GPT2LMHeadModel"]}
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    config = GPTConfig.from_dict(raw)
    net = GPTWithHead(config)
    for name, p in net.named_parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    train = torch.tensor(tok.encode(text[:cut]).ids)
    held_out = torch.tensor(tok.encode(text[cut:]).ids)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.0)
    T, B = 64, 16
    net.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = LR * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        starts = torch.randint(0, len(train) - T - 1, (B,))
        x = torch.stack([train[s:s + T] for s in starts])
        y = torch.stack([train[s + 1:s + T + 1] for s in starts])
        loss = F.cross_entropy(net(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    hub = {}
    for name, p in net.named_parameters():
        if name.startswith("lm_head."):
            continue  # tied to the token embedding
        hub[name[len("transformer."):]] = p.detach().contiguous()
    save_file(hub, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with torch.no_grad():
        held_loss = mean_loss(net, held_out)
    return {"folder": folder, "held_out": held_out, "train_loss": float(loss.detach()), "held_out_loss": held_loss}


@torch.no_grad()
def mean_loss(net, ids: torch.Tensor, window: int = 128) -> float:
    """Mean next-token cross-entropy of `ids`, in windows of the model's context."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        if len(chunk) < 2:
            break
        logits = net(chunk[None, :-1])[0].float()
        total += float(F.cross_entropy(logits, chunk[1:], reduction="sum"))
        count += len(chunk) - 1
    return total / count


@torch.no_grad()
def top1(net, ids: torch.Tensor, window: int = 128) -> torch.Tensor:
    """The argmax next token at every position of `ids`."""
    out = []
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window]
        out.append(net(chunk[None])[0].argmax(-1))
    return torch.cat(out)
