"""Tiny random checkpoints in the Hub's exact layout, for tests and smoke runs without a download.

config.json, model.safetensors with the Hub's key names (Conv1D weights [in, out]) and a
tokenizer.json trained on a few paragraphs shipped with the package.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from .config import GPTConfig
from .gpt import GPTWithHead

EOS = "<|endoftext|>"


def corpus_lines() -> list[str]:
    text = resources.files("model.network").joinpath("data/tiny_corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def train_tokenizer(model_type: str, vocab_size: int) -> Tokenizer:
    if model_type == "openai-gpt":
        tok = Tokenizer(models.BPE(unk_token="<unk>", end_of_word_suffix="</w>"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.BPEDecoder(suffix="</w>")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>"], end_of_word_suffix="</w>",
                                      show_progress=False)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_lines(), trainer)
    return tok


def make_tiny_model(out_dir: str | Path, model_type: str = "gpt2", seed: int = 0,
                    heads: Sequence[str] = (), n_positions: int = 256, n_embd: int = 64, n_layer: int = 2,
                    n_head: int = 4, vocab_size: int = 600, labels: Sequence[str] = ("NEGATIVE", "POSITIVE")) -> Path:
    """Write a random checkpoint to `out_dir`; `heads` adds e.g. sequence-classification weights."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(model_type, vocab_size)
    tok.save(str(out / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    raw = {"model_type": model_type, "vocab_size": vocab, "n_positions": n_positions, "n_embd": n_embd,
           "n_layer": n_layer, "n_head": n_head, "layer_norm_epsilon": 1e-5,
           "id2label": {str(i): name for i, name in enumerate(labels)},
           "label2id": {name: i for i, name in enumerate(labels)}}
    if model_type == "openai-gpt":
        raw.update(afn="gelu", architectures=["OpenAIGPTLMHeadModel"])
    else:
        eos = tok.token_to_id(EOS)
        raw.update(activation_function="gelu_new", bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                   architectures=["GPT2LMHeadModel"])
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")

    config = GPTConfig.from_dict(raw)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for head in ("lm", *heads):
        module = GPTWithHead(config, head)
        for name, p in module.named_parameters():
            if name in tensors:
                continue
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                value = torch.ones_like(p)
            elif name.endswith(".bias") and "ln_" in name:
                value = torch.zeros_like(p)
            else:  # wide enough that the next token is a clear choice, so greedy runs are stable
                value = torch.randn(p.shape, generator=gen) * (0.5 if "wte" in name else 0.15)
            tensors[name] = value.contiguous()
    prefixed = bool(heads)  # a fine-tuned head checkpoint keeps the `transformer.` prefix
    hub = {}
    for name, value in tensors.items():
        key = name if prefixed or not name.startswith("transformer.") else name[len("transformer."):]
        if model_type == "openai-gpt":
            key = key.replace("wte.", "tokens_embed.").replace("wpe.", "positions_embed.")
        hub[key] = value
    save_file(hub, str(out / "model.safetensors"), metadata={"format": "pt"})
    _readable_like_the_rest(out / "model.safetensors")
    return out


def _readable_like_the_rest(path: Path) -> None:
    """safetensors writes its file private (0600); give it the mode the other files get (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
