"""Model configuration read from a checkpoint's config.json.

One dataclass covers GPT-2 (pre-LayerNorm) and OpenAI GPT (post-LayerNorm); each field
that changes the math is read with the same default the Hub's configs assume.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import CheckpointError
from .activations import ACTIVATIONS

MODEL_TYPES = ("gpt2", "openai-gpt")


@dataclass
class GPTConfig:
    model_type: str = "gpt2"
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    id2label: dict = field(default_factory=lambda: {0: "LABEL_0", 1: "LABEL_1"})
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    tie_word_embeddings: bool = True
    summary_type: str = "cls_index"
    summary_use_proj: bool = True
    summary_proj_to_labels: bool = True
    summary_activation: Optional[str] = None
    summary_first_dropout: float = 0.1

    @property
    def post_layernorm(self) -> bool:
        """OpenAI GPT normalises after each residual add; GPT-2 before each sublayer."""
        return self.model_type == "openai-gpt"

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_dict(cls, raw: dict) -> "GPTConfig":
        model_type = raw.get("model_type")
        if model_type not in MODEL_TYPES:
            raise CheckpointError(
                f"unsupported model_type {model_type!r} in config.json; "
                f"this app serves {', '.join(MODEL_TYPES)}"
            )
        get = raw.get
        if model_type == "openai-gpt":
            # OpenAI GPT names its activation `afn`; its "gelu" is the tanh approximation.
            afn = get("afn", "gelu")
            activation = "gelu_new" if afn == "gelu" else afn
            n_inner = None
        else:
            activation = get("activation_function", "gelu_new")
            n_inner = get("n_inner")
        if "id2label" in raw and raw["id2label"]:
            id2label = {int(k): v for k, v in raw["id2label"].items()}
        elif get("num_labels") is not None:
            id2label = {i: f"LABEL_{i}" for i in range(int(get("num_labels")))}
        else:
            id2label = {0: "LABEL_0", 1: "LABEL_1"}
        cfg = cls(
            model_type=model_type,
            vocab_size=int(get("vocab_size", 50257 if model_type == "gpt2" else 40478)),
            n_positions=int(get("n_positions", 1024 if model_type == "gpt2" else 512)),
            n_embd=int(get("n_embd", 768)),
            n_layer=int(get("n_layer", 12)),
            n_head=int(get("n_head", 12)),
            n_inner=n_inner,
            activation_function=activation,
            layer_norm_epsilon=float(get("layer_norm_epsilon", 1e-5)),
            scale_attn_weights=bool(get("scale_attn_weights", True)),
            scale_attn_by_inverse_layer_idx=bool(get("scale_attn_by_inverse_layer_idx", False)),
            reorder_and_upcast_attn=bool(get("reorder_and_upcast_attn", False)),
            id2label=id2label,
            pad_token_id=get("pad_token_id"),
            bos_token_id=get("bos_token_id"),
            eos_token_id=get("eos_token_id"),
            tie_word_embeddings=bool(get("tie_word_embeddings", True)),
            summary_type=get("summary_type", "cls_index"),
            summary_use_proj=bool(get("summary_use_proj", True)),
            summary_proj_to_labels=bool(get("summary_proj_to_labels", True)),
            summary_activation=get("summary_activation"),
            summary_first_dropout=float(get("summary_first_dropout", 0.1)),
        )
        field_name = "afn" if model_type == "openai-gpt" else "activation_function"
        if activation not in ACTIVATIONS:
            raise CheckpointError(f"unsupported {field_name} {get(field_name)!r} in config.json; "
                                  f"supported: {', '.join(sorted(ACTIVATIONS))}")
        if cfg.summary_activation and cfg.summary_activation not in ACTIVATIONS:
            raise CheckpointError(f"unsupported summary_activation {cfg.summary_activation!r} in config.json; "
                                  f"supported: {', '.join(sorted(ACTIVATIONS))}")
        if cfg.n_embd % cfg.n_head:
            raise CheckpointError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
        return cfg

    @classmethod
    def from_file(cls, path: Path) -> "GPTConfig":
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"no config.json in {Path(path).parent}") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"config.json in {Path(path).parent} is not valid JSON: {e}") from None
        return cls.from_dict(raw)

    def parameter_count(self) -> int:
        """Parameters of the transformer with the tied LM head, from the config alone."""
        d, L, V, P = self.n_embd, self.n_layer, self.vocab_size, self.n_positions
        per_block = (
            2 * 2 * d  # two LayerNorms
            + d * 3 * d + 3 * d  # c_attn
            + d * d + d  # attn c_proj
            + d * self.inner_dim + self.inner_dim  # c_fc
            + self.inner_dim * d + d  # mlp c_proj
        )
        final_ln = 0 if self.post_layernorm else 2 * d
        return V * d + P * d + L * per_block + final_ln

    def kv_cache_bytes(self, slots: int, context: Optional[int] = None, bytes_per_value: int = 4) -> int:
        """Size of the static key/value buffers for `slots` sequences of `context` tokens."""
        context = context or self.n_positions
        return 2 * self.n_layer * slots * context * self.n_embd * bytes_per_value
