"""The GPT-2 / OpenAI GPT transformer and its heads, in one file you can read in one sitting.

config -> Conv1D -> attention -> MLP -> block -> body -> heads. Parameter names are the Hub's,
so checkpoints load without renaming (Conv1D weights stay [in, out]).

The key/value cache is an explicit argument of every forward pass: an object with
`attend(layer, q, k, v, scale, upcast)` that stores this pass's keys and values and
returns the attention output. The serving side (model/serving/kv_cache.py) provides it, and
swaps faster linear layers in for CPU decoding (model/serving/cpu_kernels.py); nothing here
knows about either.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from .activations import ACTIVATIONS
from .config import GPTConfig


class CacheView(Protocol):
    """Where one forward pass keeps and reads keys/values (see model/serving/kv_cache.py)."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               upcast: bool) -> torch.Tensor: ...


class Conv1D(nn.Module):
    """GPT-2's linear layer: y = x @ W + b with W stored [in, out], as in the checkpoints."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.n_in = n_in
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.upcast = config.reorder_and_upcast_attn  # softmax in float32 when running in half precision
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)
        scale = config.head_dim ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        self.scale = scale

    def forward(self, x, mask: Optional[torch.Tensor] = None, cache: Optional[CacheView] = None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each [B, T, C]
        q = q.view(B, T, self.n_head, -1).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, self.n_head, -1).transpose(1, 2)
        v = v.view(B, T, self.n_head, -1).transpose(1, 2)
        dtype = q.dtype
        upcast = self.upcast and dtype != torch.float32
        if cache is not None:  # the cache stores k, v and attends over everything its slot holds
            y = cache.attend(self.layer_idx, q, k, v, self.scale, upcast)
        else:
            if upcast:
                q, k, v = q.float(), k.float(), v.float()
            if mask is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        y = y.to(dtype).transpose(1, 2).reshape(B, T, C)  # heads side by side again
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Conv1D(config.n_embd, config.inner_dim)
        self.c_proj = Conv1D(config.inner_dim, config.n_embd)
        if config.activation_function not in ACTIVATIONS:
            raise ValueError(f"unknown activation_function {config.activation_function!r}")
        self.act = ACTIVATIONS[config.activation_function]

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    """GPT-2: x + attn(ln_1(x)), then + mlp(ln_2(.)). OpenAI GPT: ln_1(x + attn(x)), then ln_2(. + mlp(.))."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.post_ln = config.post_layernorm
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, cache=None):
        if self.post_ln:
            x = self.ln_1(x + self.attn(x, mask, cache))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPTBody(nn.Module):
    """The transformer body: token + position embeddings, blocks, and (GPT-2) a final LayerNorm."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = None if config.post_layernorm else nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                positions: Optional[torch.Tensor] = None, cache: Optional[CacheView] = None) -> torch.Tensor:
        """Hidden states [B, T, C] of input_ids [B, T].

        Without a cache: an ordinary causal pass over the whole input, with an optional padding
        mask [B, T]. With a cache: row b's tokens sit at `positions[b]` and attend to everything
        the cache holds for that row up to there, so a prefill and a one-token decode step are
        the same call.
        """
        B, T = input_ids.shape
        if positions is None:
            if T > self.config.n_positions:
                raise ValueError(f"{T} tokens are past the model's context of {self.config.n_positions}")
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        mask = None
        if cache is None and attention_mask is not None:
            keep = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            # A padded query still sees itself, so its (unused) row never becomes NaN.
            mask = (causal & keep) | torch.eye(T, dtype=torch.bool, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(positions)  # [B, T, C]
        for block in self.h:
            x = block(x, mask, cache)
        return self.ln_f(x) if self.ln_f is not None else x


class LMHead(nn.Module):
    """Next-token logits, tied to the token embedding unless the checkpoint unties them."""

    def __init__(self, body: GPTBody):
        super().__init__()
        self.body = [body]  # a list, so the embedding is not registered twice
        self.untied: Optional[nn.Parameter] = None  # set by the loader for an untied checkpoint
        self.n_in = body.config.n_embd

    def weight(self) -> torch.Tensor:  # [V, C]
        return self.untied if self.untied is not None else self.body[0].wte.weight

    def forward(self, hidden):
        return hidden @ self.weight().t()


class SequenceSummary(nn.Module):
    """The multiple-choice head: hidden state at the cls index, optional projection and activation."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.summary_type = config.summary_type
        self.summary = None
        if config.summary_use_proj:
            out = 1 if config.summary_proj_to_labels else config.n_embd
            self.summary = nn.Linear(config.n_embd, out)
        act = config.summary_activation  # any activation name, as the reference allows; None/"" for none
        self.activation = ACTIVATIONS[act] if act else None

    def forward(self, hidden, cls_index=None):  # hidden [..., T, C] -> [..., C or 1]
        if self.summary_type == "first":
            out = hidden[..., 0, :]
        elif self.summary_type == "mean":
            out = hidden.mean(dim=-2)
        elif self.summary_type == "cls_index":
            if cls_index is None:
                cls_index = torch.full(hidden.shape[:-2], hidden.shape[-2] - 1, dtype=torch.long, device=hidden.device)
            idx = cls_index[..., None, None].expand(*cls_index.shape, 1, hidden.shape[-1])
            out = hidden.gather(-2, idx).squeeze(-2)
        else:  # "last"
            out = hidden[..., -1, :]
        if self.summary is not None:
            out = self.summary(out)
        if self.activation is not None:
            out = self.activation(out)
        return out


def last_token_index(input_ids: torch.Tensor, pad_token_id: Optional[int]) -> torch.Tensor:
    """Index of the last non-padding token of each row (the reference's rule for classification)."""
    B, T = input_ids.shape
    if pad_token_id is None:
        if B != 1:
            raise ValueError("cannot classify a batch of more than one text without a pad_token_id in config.json")
        return torch.full((B,), T - 1, dtype=torch.long, device=input_ids.device)
    non_pad = (input_ids != pad_token_id).int()
    return (torch.arange(T, device=input_ids.device) * non_pad).argmax(-1)


HEADS = ("lm", "sequence-classification", "question-answering", "token-classification", "double-heads")

# The checkpoint tensors (after the body's) that each head owns.
HEAD_PREFIXES = {
    "lm": ("lm_head.",),
    "sequence-classification": ("score.",),
    "question-answering": ("qa_outputs.",),
    "token-classification": ("classifier.",),
    "double-heads": ("lm_head.", "multiple_choice_head."),
}


class GPTWithHead(nn.Module):
    """The body with one head: what `model.load(name, head=...)` returns."""

    def __init__(self, config: GPTConfig, head: str = "lm", body: Optional[GPTBody] = None):
        """`body`: share an existing body (an extra head of a loaded model adds only its own layer)."""
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
        self.config = config
        self.head = head
        self.transformer = body if body is not None else GPTBody(config)
        if head in ("lm", "double-heads"):
            self.lm_head = LMHead(self.transformer)
        if head == "sequence-classification":
            self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)
        if head == "question-answering":
            self.qa_outputs = nn.Linear(config.n_embd, 2)
        if head == "token-classification":
            self.classifier = nn.Linear(config.n_embd, config.num_labels)
        if head == "double-heads":
            self.multiple_choice_head = SequenceSummary(config)

    @property
    def device(self) -> torch.device:
        """Where the weights live (and so every input, cache and step): asked here, nowhere else."""
        return self.transformer.wpe.weight.device

    def forward(self, input_ids, attention_mask=None, mc_token_ids=None, **cache_args):
        if self.head == "double-heads":
            B, C, T = input_ids.shape  # C choices per example
            flat_mask = attention_mask.reshape(B * C, T) if attention_mask is not None else None
            hidden = self.transformer(input_ids.reshape(B * C, T), flat_mask).view(B, C, T, -1)
            mc = self.multiple_choice_head(hidden, mc_token_ids).squeeze(-1)
            return self.lm_head(hidden), mc
        hidden = self.transformer(input_ids, attention_mask, **cache_args)
        if self.head == "lm":
            return self.lm_head(hidden)
        if self.head == "sequence-classification":
            logits = self.score(hidden)  # [B, T, labels]
            index = last_token_index(input_ids, self.config.pad_token_id)
            return logits[torch.arange(input_ids.shape[0], device=logits.device), index]
        if self.head == "question-answering":
            start, end = self.qa_outputs(hidden).split(1, dim=-1)
            return start.squeeze(-1), end.squeeze(-1)
        return self.classifier(hidden)  # token-classification
