"""The GPT-2 / OpenAI GPT transformer, its heads, and the static KV cache they write into.

One file you can read in one sitting. Parameter names are the Hub's, so checkpoints load
without renaming (Conv1D weights stay [in, out]).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernel_choice
from .config import GPTConfig


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,  # exact (erf) GELU
    "gelu_new": _gelu_tanh,  # GPT-2's tanh approximation
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "linear": lambda x: x,
}


class KVCache(nn.Module):
    """Key/value buffers for `slots` sequences, allocated once: [layer, slot, head, position, dim].

    A forward pass writes the keys/values of the positions it computes in place and reads
    back positions [0, length) of its slots. Nothing is ever concatenated or reallocated,
    so the shapes a decode step sees are fixed.
    """

    def __init__(self, config: GPTConfig, slots: int, context: Optional[int] = None,
                 dtype=torch.float32, device="cpu"):
        super().__init__()
        self.slots = slots
        self.context = context or config.n_positions
        shape = (config.n_layer, slots, config.n_head, self.context, config.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    @torch.no_grad()
    def copy_slot(self, src: int, dst: int, length: int, start: int = 0) -> None:
        """Fork: make positions [start, length) of slot `dst` those of slot `src`.

        `start` skips what `dst` already holds in common with `src`.
        """
        if src != dst and length > start:
            self.k[:, dst, :, start:length].copy_(self.k[:, src, :, start:length])
            self.v[:, dst, :, start:length].copy_(self.v[:, src, :, start:length])


GATHER_MIN_ROWS = 4
GATHER_MAX_POSITIONS = 8192  # rows x longest row: the size of the copy a gathered read makes
SHARED_PREFIX_MIN = 64  # shorter shared prompts are cheaper to read once per row


class CacheView:
    """Where one forward pass reads and writes in a KVCache: slots [B], positions [B, T].

    Each row attends to its own slot's positions [0, its last position] read as a view of
    the buffers, so a decode step copies no cache memory whichever slots it uses.

    `shared` lists groups of decode rows whose slots hold the same first `prefix` positions
    (the n suggestions forked from one prompt): such a group reads that prefix once for all
    its rows instead of once per row, so n suggestions on a long document cost about what
    one does.
    """

    def __init__(self, cache: KVCache, slots: Sequence[int], positions: torch.Tensor,
                 shared: Sequence[tuple[Sequence[int], int]] = ()):
        self.cache = cache
        self.positions = positions
        self.slots = list(slots)
        self.lengths = [p + 1 for p in positions.max(dim=1).values.tolist()]
        if max(self.lengths) > cache.context:
            raise ValueError(f"position {max(self.lengths) - 1} is past the cache's context of {cache.context}")
        self.slot_index = torch.tensor(self.slots, device=positions.device)[:, None]
        T = positions.shape[1]
        self.shared = []
        if T == 1:
            for rows, prefix in shared:
                rows = list(rows)
                if len(rows) > 1 and prefix >= SHARED_PREFIX_MIN:
                    if any(self.lengths[b] <= prefix for b in rows):
                        raise ValueError("a row of a shared group must decode past its shared prefix")
                    self.shared.append((rows, prefix))
        grouped = {b for rows, _ in self.shared for b in rows}
        self.solo = [b for b in range(len(self.slots)) if b not in grouped]
        # Each row reads a view of its own slot (no copy) unless the rows are many and short:
        # then one attention call over a gathered copy costs less than a call per row.
        self.gather_mask = None
        if T == 1 and not self.shared and len(self.slots) >= GATHER_MIN_ROWS and \
                len(self.slots) * max(self.lengths) <= GATHER_MAX_POSITIONS:
            keys = torch.arange(max(self.lengths), device=positions.device)
            self.gather_mask = keys[None, None, None, :] <= positions[:, None, :, None]
        self.masks = [None] * len(self.slots)
        if T > 1:  # several new tokens: each sees the slot's earlier positions and the ones before it
            for b, length in enumerate(self.lengths):
                keys = torch.arange(length, device=positions.device)
                self.masks[b] = keys[None, None, None, :] <= positions[b][None, None, :, None]

    def _rows(self, buffer: torch.Tensor) -> torch.Tensor:
        """Positions [0, longest) of this pass's slots: a view when they are consecutive."""
        first, n, longest = self.slots[0], len(self.slots), max(self.lengths)
        if self.slots == list(range(first, first + n)):
            return buffer[first:first + n, :, :longest]
        return buffer[:, :, :longest].index_select(0, self.slot_index[:, 0])

    def attend(self, layer: int, q, k, v, scale: float, upcast: bool) -> torch.Tensor:
        """Write this step's k, v ([B, H, T, D]) into the cache; attention output [B, H, T, D]."""
        ck, cv = self.cache.k[layer], self.cache.v[layer]
        ck[self.slot_index, :, self.positions] = k.transpose(1, 2).to(ck.dtype)
        cv[self.slot_index, :, self.positions] = v.transpose(1, 2).to(cv.dtype)
        if self.gather_mask is not None:  # many short rows: one call over a gathered copy
            kb, vb = self._rows(ck), self._rows(cv)
            if upcast:
                q, kb, vb = q.float(), kb.float(), vb.float()
            return F.scaled_dot_product_attention(q, kb, vb, attn_mask=self.gather_mask, scale=scale).to(k.dtype)
        out = torch.empty_like(q)
        for rows, prefix in self.shared:
            out[rows] = self._attend_shared(ck, cv, q[rows], rows, prefix, scale, upcast).to(q.dtype)
        for b in self.solo:  # a view per row: no copy
            slot, length = self.slots[b], self.lengths[b]
            qb, kb, vb = q[b:b + 1], ck[slot:slot + 1, :, :length], cv[slot:slot + 1, :, :length]
            if upcast:
                qb, kb, vb = qb.float(), kb.float(), vb.float()
            out[b:b + 1] = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=self.masks[b], scale=scale)
        return out

    def _attend_shared(self, ck, cv, q, rows, prefix: int, scale: float, upcast: bool) -> torch.Tensor:
        """One decode token for each of `rows`: the shared prefix from the first row's slot,
        read once, then each row's own later positions; one softmax over both. [n, H, 1, D]."""
        first = self.slots[rows[0]]
        own = max(self.lengths[b] for b in rows) - prefix
        qg = q[:, :, 0].transpose(0, 1)  # [H, n, D]
        kp, vp = ck[first, :, :prefix], cv[first, :, :prefix]  # [H, P, D]
        ks = torch.stack([ck[self.slots[b], :, prefix:prefix + own] for b in rows])  # [n, H, own, D]
        vs = torch.stack([cv[self.slots[b], :, prefix:prefix + own] for b in rows])
        if upcast:
            qg, kp, vp, ks, vs = qg.float(), kp.float(), vp.float(), ks.float(), vs.float()
        scores = torch.cat([qg @ kp.transpose(1, 2), torch.einsum("hnd,nhsd->hns", qg, ks)], dim=-1) * scale
        ends = torch.tensor([self.lengths[b] for b in rows], device=q.device)
        past_end = torch.arange(prefix + own, device=q.device)[None, :] >= ends[:, None]  # [n, P + own]
        probs = scores.masked_fill(past_end, float("-inf")).softmax(dim=-1)
        out = probs[..., :prefix] @ vp + torch.einsum("hns,nhsd->hnd", probs[..., prefix:], vs)
        return out.transpose(0, 1)[:, :, None]


class AllSlotsView:
    """One decode token for every slot at once, with shapes that never change.

    Row i is slot i; each row attends over the whole context under a mask of its own
    positions. No Python number is read from the GPU, so the step can be captured as a
    CUDA graph and replayed. Rows with nothing to decode write at the last position, which
    the scheduler never uses for real tokens.
    """

    def __init__(self, cache: KVCache, positions: torch.Tensor):
        self.cache = cache
        self.positions = positions  # [S, 1]
        keys = torch.arange(cache.context, device=positions.device)
        self.mask = keys[None, None, None, :] <= positions[:, None, :, None]  # [S, 1, 1, context]
        self.rows = torch.arange(cache.slots, device=positions.device)[:, None]

    def attend(self, layer: int, q, k, v, scale: float, upcast: bool) -> torch.Tensor:
        ck, cv = self.cache.k[layer], self.cache.v[layer]
        ck[self.rows, :, self.positions] = k.transpose(1, 2).to(ck.dtype)
        cv[self.rows, :, self.positions] = v.transpose(1, 2).to(cv.dtype)
        if upcast:
            q, ck, cv = q.float(), ck.float(), cv.float()
        return F.scaled_dot_product_attention(q, ck, cv, attn_mask=self.mask, scale=scale).to(q.dtype)


def cpu_packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _packed_linear(x, packed, bias):
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _pieces(n: int) -> int:
    """One piece per thread: the largest count up to the thread count that divides n."""
    for parts in range(min(torch.get_num_threads(), n), 1, -1):
        if n % parts == 0:
            return parts
    return 1


def one_row_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [1, I] @ weight [I, O], cut along I so that each thread streams its own block of rows.

    A decode step with one row is a matrix-vector product that only reads memory. As a batch
    of one slab per thread (then summed) it read gpt2's matrices at 24-33 GB/s on a 2-core
    machine, where the BLAS and oneDNN calls reached 13-20 GB/s.
    """
    I, O = weight.shape
    parts = _pieces(I)
    if parts == 1:
        return x @ weight
    return torch.bmm(x.view(parts, 1, I // parts), weight.view(parts, I // parts, O)).sum(0)


def one_row_matmul_t(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [1, I] @ weight[O, I].t(), cut along O (one contiguous block of outputs per thread)."""
    O, I = weight.shape
    parts = min(torch.get_num_threads(), O)
    even = O - O % parts
    # x as a transposed row (strides 0, 1, I): BLAS takes its matrix-vector kernel; a plain
    # [I, 1] column goes through the general product at a quarter of the speed.
    y = torch.bmm(weight[:even].view(parts, even // parts, I), x.t().expand(parts, I, 1)).view(1, even)
    if even < O:  # the few rows left over (an odd vocabulary size)
        y = torch.cat([y, x @ weight[even:].t()], dim=1)
    return y


class Conv1D(nn.Module):
    """GPT-2's linear layer: y = x @ W + b with W stored [in, out], as in the checkpoints.

    On CPU (`prepare_for_cpu`) a one-row input takes the `one_row` kernel timed fastest on
    this machine (kernel_choice.py): "split" (`one_row_matmul`), "plain" (BLAS) or "packed".
    Several rows take a oneDNN-packed copy of the weight when there is one (`pack`): those
    few rows of a batched decode step run two to three times faster than through BLAS.
    """

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.n_in = n_in
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.packed = None
        self.one_row: Optional[str] = None

    def pack(self) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach().t().contiguous())

    def forward(self, x):
        if self.one_row is not None and x.numel() == x.shape[-1]:
            return self._one_row(x.reshape(1, -1)).view(*x.shape[:-1], -1)
        if self.packed is not None:
            return _packed_linear(x, self.packed, self.bias)
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)

    def _one_row(self, x):
        if self.one_row == "split":
            return one_row_matmul(x, self.weight).add_(self.bias)
        if self.one_row == "packed" and self.packed is not None:
            return _packed_linear(x, self.packed, self.bias)
        return torch.addmm(self.bias, x, self.weight)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)
        scale = config.head_dim ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        self.scale = scale

    def forward(self, x, mask: Optional[torch.Tensor], view: Optional[CacheView]):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, -1).transpose(1, 2)
        k = k.view(B, T, self.n_head, -1).transpose(1, 2)
        v = v.view(B, T, self.n_head, -1).transpose(1, 2)
        dtype = q.dtype
        upcast = self.config.reorder_and_upcast_attn and dtype != torch.float32
        if view is not None:
            y = view.attend(self.layer_idx, q, k, v, self.scale, upcast)
            return self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        if upcast:
            q, k, v = q.float(), k.float(), v.float()
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        y = y.to(dtype).transpose(1, 2).reshape(B, T, C)
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

    def forward(self, x, mask, view):
        if self.post_ln:
            x = self.ln_1(x + self.attn(x, mask, view))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), mask, view)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """The transformer body: token + position embeddings, blocks, and (GPT-2) a final LayerNorm."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = None if config.post_layernorm else nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                cache: Optional[KVCache] = None, slots: Optional[Sequence[int]] = None,
                positions: Optional[torch.Tensor] = None,
                shared: Sequence[tuple[Sequence[int], int]] = ()) -> torch.Tensor:
        """Hidden states [B, T, C].

        Without a cache: an ordinary causal forward over the whole input (with optional
        padding mask). With a cache: row b writes its tokens at `positions[b]` of slot
        `slots[b]` and attends to everything its slot holds up to that position, so a
        prefill and a one-token decode step are the same call. `slots="all"` decodes one
        token in every slot at fixed shapes (AllSlotsView), for CUDA graphs. `shared`: groups of
        decode rows whose slots hold the same prefix, as (row indices, prefix length); see CacheView.
        """
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        view = mask = None
        if cache is not None and slots == "all":
            view = AllSlotsView(cache, positions)  # fixed shapes: no check that reads the GPU
        elif int(positions.max()) >= self.config.n_positions:
            raise ValueError(f"position {int(positions.max())} is past the model's context of {self.config.n_positions}")
        elif cache is not None:
            view = CacheView(cache, slots if slots is not None else range(B), positions, shared)
        x = self.wte(input_ids) + self.wpe(positions)
        if view is None and attention_mask is not None:
            keep = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            # A padded query still sees itself, so its (unused) row never becomes NaN.
            mask = (causal & keep) | torch.eye(T, dtype=torch.bool, device=x.device)
        for block in self.h:
            x = block(x, mask, view)
        return self.ln_f(x) if self.ln_f is not None else x


class LMHead(nn.Module):
    """Next-token logits, tied to the token embedding unless the checkpoint unties them.

    One-row inputs take the `one_row` kernel, as in Conv1D."""

    def __init__(self, body: GPT, weight: Optional[torch.Tensor] = None):
        super().__init__()
        self.body = [body]  # a list, so the embedding is not registered twice
        self.untied = None if weight is None else nn.Parameter(weight)
        self.n_in = body.config.n_embd
        self.packed = None
        self.one_row: Optional[str] = None

    def weight(self) -> torch.Tensor:
        return self.untied if self.untied is not None else self.body[0].wte.weight

    def pack(self) -> None:
        """A oneDNN copy of the (tied) weight; the embedding lookup keeps the original."""
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight().detach().contiguous())

    def forward(self, hidden):
        if self.one_row is not None and hidden.numel() == hidden.shape[-1]:
            return self._one_row(hidden.reshape(1, -1)).view(*hidden.shape[:-1], -1)
        if self.packed is not None:
            return _packed_linear(hidden, self.packed, None)
        return hidden @ self.weight().t()

    def _one_row(self, x):
        if self.one_row == "split":
            return one_row_matmul_t(x, self.weight())
        if self.one_row == "packed" and self.packed is not None:
            return _packed_linear(x, self.packed, None)
        return x @ self.weight().t()


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

    def forward(self, hidden, cls_index=None):
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


class GPTModel(nn.Module):
    """The body with one head: what `model.load(name, head=...)` returns."""

    def prepare_for_cpu(self, pack: bool = True, one_row: str = "auto") -> bool:
        """CPU float32 inference: (`pack`) a oneDNN copy of each matrix for several rows, and
        for one row the kernel `one_row` ("auto": the fastest here, see kernel_choice.py).
        Whether the model packed its weights; the kernels chosen are in `one_row_kernels`."""
        weight = self.transformer.wte.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            return False
        pack = pack and cpu_packing_available()
        layers = [m for m in self.transformer.modules() if isinstance(m, Conv1D)]
        head = getattr(self, "lm_head", None)
        for module in layers + ([head] if head is not None else []):
            if pack and module.packed is None:
                module.pack()
        self.one_row_kernels = kernel_choice.apply(layers, head, one_row)
        return pack

    def packed_bytes(self) -> int:
        return sum(m.packed.numel() * m.packed.element_size() for m in self.modules()
                   if isinstance(m, (Conv1D, LMHead)) and m.packed is not None)

    def __init__(self, config: GPTConfig, head: str = "lm"):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
        self.config = config
        self.head = head
        self.one_row_kernels: dict[str, str] = {}  # set by prepare_for_cpu
        self.transformer = GPT(config)
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

    def forward(self, input_ids, attention_mask=None, mc_token_ids=None, **cache_args):
        if self.head == "double-heads":
            B, C, T = input_ids.shape
            flat_mask = attention_mask.reshape(B * C, T) if attention_mask is not None else None
            hidden = self.transformer(input_ids.reshape(B * C, T), flat_mask).view(B, C, T, -1)
            mc = self.multiple_choice_head(hidden, mc_token_ids).squeeze(-1)
            return self.lm_head(hidden), mc
        hidden = self.transformer(input_ids, attention_mask, **cache_args)
        if self.head == "lm":
            return self.lm_head(hidden)
        if self.head == "sequence-classification":
            logits = self.score(hidden)
            index = last_token_index(input_ids, self.config.pad_token_id)
            return logits[torch.arange(input_ids.shape[0], device=logits.device), index]
        if self.head == "question-answering":
            start, end = self.qa_outputs(hidden).split(1, dim=-1)
            return start.squeeze(-1), end.squeeze(-1)
        return self.classifier(hidden)  # token-classification
