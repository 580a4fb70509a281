"""CPU linear layers for decoding, swapped into a loaded network in place of its own.

A decode step with one row only streams weight matrices from memory, and which call
streams fastest depends on the CPU (kernel_choice.py times them). With several rows a
oneDNN-packed copy of each matrix beats the BLAS call 2-3x. `prepare_for_cpu` replaces every
`Conv1D` and the LM head of a model with `CpuLinear` / `CpuLMHead`, the way gpt-fast's
quantize.py swaps its layers in without touching model.py.

One float copy of each matrix: a packed body matrix replaces its plain weight (its one-row
product is then the packed one too), so a float32 model holds its weights once, not twice. The
tied LM head is packed beside the token embedding, whose rows are looked up: a checkpoint's
tensors are mapped from the safetensors file (weights.py), so the plain embedding stays in the
file's pages and only the rows a request looks up are read into memory.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..network.gpt import Conv1D, GPTWithHead, LMHead
from . import kernel_choice
from .heap import trim_heap


def cpu_packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def row_bucket(rows: int) -> int:
    """The row count a packed product is run at: `rows` rounded up to a multiple of a quarter of
    its power of two, and of 16, so fewer than max(16, rows / 4) more rows are computed.

    oneDNN builds (and caches, up to ONEDNN_PRIMITIVE_CACHE_CAPACITY, 1,024) a primitive for each
    input shape it sees, about 0.5 MB each for one of gpt2's matrices: prompt chunks of every
    length made a gpt2 server's memory grow by about 2 MB per new length, up to several hundred MB.
    With buckets there are about four shapes per doubling: a few dozen in all."""
    if rows <= 16:
        return rows  # decode steps: one row per suggestion being written, a few shapes
    step = max(16, 1 << (rows.bit_length() - 3))
    return -(-rows // step) * step


def _packed_linear(x, packed, bias):
    rows = x.numel() // x.shape[-1]
    bucket = row_bucket(rows)
    if bucket == rows:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    flat = torch.zeros(bucket, x.shape[-1], dtype=x.dtype)
    flat[:rows] = x.reshape(rows, -1)
    y = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
    return y[:rows].view(*x.shape[:-1], -1)


SPLIT_MAX_ROWS = 16  # the head's rows a per-thread cut takes (decode steps); more go to BLAS


def _pieces(n: int) -> int:
    """One piece per thread: the largest count up to the thread count that divides n."""
    for parts in range(min(torch.get_num_threads(), n), 1, -1):
        if n % parts == 0:
            return parts
    return 1


def one_row_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [1, I] @ weight [I, O], cut along I so that each thread streams its own block of rows
    (a batch of one slab per thread, then summed)."""
    I, O = weight.shape
    parts = _pieces(I)
    if parts == 1:
        return x @ weight
    return torch.bmm(x.view(parts, 1, I // parts), weight.view(parts, I // parts, O)).sum(0)


def one_row_matmul_t(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, I] @ weight[O, I].t(), cut along O (one contiguous block of outputs per thread).

    Made for one row, and as good for the few rows of a step that writes several suggestions
    (3 rows: about a quarter of the time of the plain BLAS call over gpt2's LM head)."""
    O, I = weight.shape
    M = x.shape[0]
    parts = min(torch.get_num_threads(), O)
    even = O - O % parts
    # x as a transposed row (strides 0, 1, I): BLAS takes its matrix-vector kernel; a plain
    # [I, 1] column goes through the general product at a quarter of the speed.
    y = torch.bmm(weight[:even].view(parts, even // parts, I), x.t().expand(parts, I, M))  # [parts, O/parts, M]
    y = y.view(1, even) if M == 1 else y.reshape(even, M).t()
    if even < O:  # the few rows left over (an odd vocabulary size)
        y = torch.cat([y, x @ weight[even:].t()], dim=1)
    return y


class CpuLinear(nn.Module):
    """A Conv1D (y = x @ W + b, W [in, out]) with a one-row kernel, or a packed copy in its place.

    A one-row input takes `one_row`: "split" (one_row_matmul), "plain" (BLAS) or "packed".
    Once packed (`pack`), the packed copy is the only one: every product runs on it.
    """

    def __init__(self, linear: Conv1D):
        super().__init__()
        self.n_in = linear.n_in
        self.weight = linear.weight  # the same parameters: names and tensors unchanged
        self.bias = linear.bias
        self.packed: Optional[torch.Tensor] = None
        self.one_row: Optional[str] = None

    def pack(self) -> None:
        """The oneDNN copy replaces the plain weight (a float matrix is held once)."""
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach().t().contiguous())
        self.weight = None
        self.one_row = "packed"

    @property
    def has_plain(self) -> bool:
        return self.weight is not None

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


class CpuLMHead(nn.Module):
    """The (tied) LM head with a one-row kernel and an optional packed copy, as CpuLinear; the
    embedding keeps the plain matrix for its row lookups (see the module doc)."""

    def __init__(self, head: LMHead):
        super().__init__()
        self.body = head.body  # a list: the embedding is not registered twice
        self.untied = head.untied
        self.n_in = head.n_in
        self.packed: Optional[torch.Tensor] = None
        self.one_row: Optional[str] = None

    def weight(self) -> torch.Tensor:  # [V, C]
        return self.untied if self.untied is not None else self.body[0].wte.weight

    def pack(self) -> None:
        """A oneDNN copy of the (tied) weight; the embedding lookup keeps the original."""
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight().detach().contiguous())

    def forward(self, hidden):
        rows = hidden.numel() // hidden.shape[-1]
        if self.one_row is not None and rows == 1:
            return self._one_row(hidden.reshape(1, -1)).view(*hidden.shape[:-1], -1)
        if self.packed is not None:
            return _packed_linear(hidden, self.packed, None)
        if self.one_row == "split" and rows <= SPLIT_MAX_ROWS:
            return one_row_matmul_t(hidden.reshape(rows, -1), self.weight()).view(*hidden.shape[:-1], -1)
        return hidden @ self.weight().t()

    def _one_row(self, x):
        if self.one_row == "split":
            return one_row_matmul_t(x, self.weight())
        if self.one_row == "packed" and self.packed is not None:
            return _packed_linear(x, self.packed, None)
        return x @ self.weight().t()


def swap_cpu_layers(model: GPTWithHead) -> tuple[list[CpuLinear], Optional[CpuLMHead]]:
    """Replace the model's Conv1D layers and LM head with their CPU versions (once)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                setattr(parent, name, CpuLinear(child))
    if isinstance(getattr(model, "lm_head", None), LMHead):
        model.lm_head = CpuLMHead(model.lm_head)
    layers = [m for m in model.transformer.modules() if isinstance(m, CpuLinear)]
    return layers, getattr(model, "lm_head", None)


def prepare_for_cpu(model: GPTWithHead, pack: bool = True, one_row: str = "auto") -> dict:
    """CPU float32 inference: (`pack`) a oneDNN copy of each body matrix in place of its plain
    weight, and for one row of the plain matrices (the LM head; every matrix without packing)
    the kernel `one_row` ("auto": the fastest here, see kernel_choice.py).

    {"packed": whether weights were packed, "one_row_kernels": {"layers": ..., "head": ...}};
    a model that is not CPU float32 is left as it is.
    """
    weight = model.transformer.wpe.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or \
            not isinstance(model.transformer.wte, nn.Embedding):  # quantized weights have kernels of their own
        return {"packed": False, "one_row_kernels": {}}
    pack = pack and cpu_packing_available()
    layers, head = swap_cpu_layers(model)
    for module in layers + ([head] if head is not None else []):
        if pack and module.packed is None:
            module.pack()
    trim_heap()  # the plain copies the packed ones replaced
    return {"packed": pack, "one_row_kernels": kernel_choice.apply(layers, head, one_row)}


def packed_bytes(model: nn.Module) -> int:
    """Memory of the packed copies (they sit next to the plain weights)."""
    return sum(m.packed.numel() * m.packed.element_size() for m in model.modules()
               if isinstance(m, (CpuLinear, CpuLMHead)) and m.packed is not None)
