"""Weights in fewer bits, swapped into a loaded network in place of its float layers.

As gpt-fast's quantize.py does: the network file is untouched; after loading the ordinary
checkpoint, each Conv1D of the body and the tied embedding / LM head are replaced by modules
that hold the weights in `int8`, `int4` or `nf4`, and the float matrices are dropped (no float
copy of a quantized matrix is kept). LayerNorms, biases, position embeddings, attention and the
KV cache stay in the float compute dtype.

- int8: one scale per output channel (symmetric). Products run through one of two kernels chosen
  by timing at load (int8_kernels.py): torch's `_weight_int8pack_mm` with bfloat16 activations, or
  fbgemm's int8 × int8 product with activations quantized per token, whose input channels are
  smoothed first (smoothing.py) so that outlier channels keep their precision.
- int4: weight-only, groups of 128 inputs with a scale and a zero each (tinygemm's format);
  `_weight_int4pack_mm_for_cpu` on CPU with bfloat16 activations. torchao's CPU int4 and int8
  weight-only layouts dispatch to these same aten kernels, so they are called directly.
- nf4: QLoRA's 4-bit NormalFloat code book, blocks of 128 with an absmax scale each (the format
  the reference documentation loads gpt2-xl in with bitsandbytes); products dequantize a
  matrix, then multiply, on any device.

Where a fast kernel is missing on a device (a GPU without int8/int4 pack kernels), the same
stored bits are dequantized and multiplied instead, so every precision runs everywhere.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from ..network.gpt import Conv1D, GPTWithHead, LMHead
from ..network.known import PRECISION_ALIASES as ALIASES
from ..network.known import PRECISIONS
from . import int8_kernels, smoothing

FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZED = ("int8", "int4", "nf4")
GROUP = 128  # inputs per scale in int4 and nf4 (64 or 32 for narrower matrices)
ACT = torch.bfloat16  # activations of the int8 / int4 kernels

# QLoRA's NF4 code book: the 16 quantiles of a standard normal, scaled to [-1, 1].
NF4_CODES = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                          -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                          0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                          0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def precision_name(value: Union[str, torch.dtype, None]) -> Optional[str]:
    """"int8", torch.float16, "fp16"... as one of PRECISIONS (None stays None); ValueError otherwise."""
    if value is None or value == "":
        return None
    if isinstance(value, torch.dtype):
        for name, dtype in FLOATS.items():
            if dtype == value:
                return name
        raise ValueError(f"unsupported dtype {value}; choose one of {', '.join(PRECISIONS)}")
    name = ALIASES.get(str(value).strip().lower(), str(value).strip().lower())
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {value!r}; choose one of {', '.join(PRECISIONS)}")
    return name


# -- storing weights in fewer bits ------------------------------------------------------------

def int8_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (int8 [N, K], scales [N]): w ≈ q * scale, per output row."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    return q, scale


def group_size(n_in: int) -> int:
    """GROUP inputs per scale, or 32 for a narrower matrix whose width GROUP does not divide."""
    for size in (GROUP, 64, 32):
        if n_in % size == 0:
            return size
    raise ValueError(f"a 4-bit matrix needs a width divisible by 32 (this one has {n_in} inputs)")


def int4_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (codes 0..15 as uint8 [N, K], scales and zeros [K/group, N, 2]) in tinygemm's
    convention: w ≈ (code - 8) * scale + zero, per group of inputs."""
    N, K = w.shape
    size = group_size(K)
    g = w.float().view(N, K // size, size)
    low, high = g.amin(-1), g.amax(-1)
    scale = (high - low).clamp(min=1e-8) / 15
    codes = torch.round((g - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).view(N, K)
    zero = low + 8 * scale
    return codes, torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()


def nf4_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (codes 0..15 as uint8 [N, K], absmax [N, K/group]): w ≈ NF4_CODES[code] * absmax."""
    N, K = w.shape
    size = group_size(K)
    g = w.float().view(N, K // size, size)
    absmax = g.abs().amax(-1).clamp(min=1e-8)
    normed = g / absmax[..., None]
    codes = (normed[..., None] - NF4_CODES).abs().argmin(-1).to(torch.uint8).view(N, K)
    return codes, absmax


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [N, K] -> two per byte [N, K/2]."""
    return (codes[:, 0::2] << 4) | codes[:, 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] bytes -> [..., K] codes."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).flatten(-2)


def _pad_rows(w: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-w.shape[0]) % multiple
    return torch.cat([w, w.new_zeros(pad, w.shape[1])]) if pad else w


# -- the quantized matrices: a product and a row lookup -----------------------------------------

class QuantMatrix(nn.Module):
    """One weight matrix W [N, K] (rows = outputs) in `precision`: `x @ W.t()` and `rows(ids)`."""

    def __init__(self, w: torch.Tensor, precision: str, int8_kernel: str = "weight-only",
                 smooth: Optional[torch.Tensor] = None):
        """`int8_kernel`: which int8 product `prepare` sets up (int8_kernels.KERNELS); `smooth` [K]:
        input-channel scales (smoothing.py), folded into the stored weights and divided out of x."""
        super().__init__()
        w = w.contiguous()  # a Conv1D weight arrives transposed; the kernels want rows in memory order
        self.precision = precision
        self.n_out, self.n_in = w.shape
        self.group = group_size(self.n_in) if precision != "int8" else 0
        self.kernel = False  # set by `prepare()`: the device's fast kernel is used
        self.needs_rows = False  # set for the tied embedding: rows are read from the stored bits
        self.int8_kernel = int8_kernel
        self.dynamic = None  # fbgemm's packed weight, when the dynamic int8 kernel runs
        # x is multiplied by 1 / s before every product; the weights' input columns by s, once
        self.register_buffer("inverse_smooth", None if smooth is None else 1 / smooth.float().contiguous())
        self.packed_bias: Optional[torch.Tensor] = None  # the bias fbgemm adds (dynamic kernel)
        if smooth is not None:
            w = w.float() * smooth.float()
        if precision == "int8":
            q, scale = int8_weights(w)
            self.register_buffer("q", q)
            self.register_buffer("scale", scale if int8_kernel == "dynamic" else scale.to(ACT))
        elif precision == "int4":
            codes, scales_zeros = int4_weights(_pad_rows(w, 16))
            self.register_buffer("packed", pack_nibbles(codes))  # [N', K/2]
            self.register_buffer("scales_zeros", scales_zeros.to(ACT))  # [K/GROUP, N', 2]
            self.register_buffer("int4pack", None)
        elif precision == "nf4":
            codes, absmax = nf4_weights(w)
            self.register_buffer("packed", pack_nibbles(codes))
            self.register_buffer("absmax", absmax.to(ACT))
        else:
            raise ValueError(f"{precision} is not a quantized precision")

    def prepare(self, bias: Optional[torch.Tensor] = None) -> None:
        """On the device the matrix now lives on: use the fast packed kernel where there is one.
        `bias`: the layer's bias, which the dynamic int8 kernel adds itself (matmul then must get it)."""
        if self.kernel:
            return
        device = self.packed.device if self.precision != "int8" else self.q.device
        if self.precision == "int8" and self.int8_kernel == "dynamic" and device.type == "cpu":
            self.dynamic = int8_kernels.pack_dynamic(self.q, self.scale, bias)
            if self.dynamic is not None:
                self.packed_bias = None if bias is None else bias.detach()
                self.kernel = True
                if not self.needs_rows:
                    self.q = None  # fbgemm's layout is all a product needs: one int8 copy
                return
        if self.precision == "int8":
            self.scale = self.scale.to(ACT)
            self.kernel = _works(lambda: torch._weight_int8pack_mm(torch.zeros(1, self.n_in, dtype=ACT, device=device),
                                                                  self.q, self.scale))
        elif self.precision == "int4" and device.type == "cpu":
            codes = unpack_nibbles(self.packed).to(torch.int32)
            self.int4pack = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
            self.kernel = _works(lambda: torch._weight_int4pack_mm_for_cpu(
                torch.zeros(1, self.n_in, dtype=ACT, device=device), self.int4pack, self.group, self.scales_zeros))
            if not self.kernel:
                self.int4pack = None
            elif not self.needs_rows:
                self.packed = None  # the kernel's own layout is all a product needs: one 4-bit copy

    def extra_bytes(self) -> int:
        """Memory held outside the module's tensors: fbgemm's packed weight (int8 codes and a
        32-bit column offset per output)."""
        return self.n_out * self.n_in + 4 * self.n_out if self.dynamic is not None else 0

    def dequantized(self, ids: Optional[torch.Tensor] = None, dtype=torch.float32) -> torch.Tensor:
        """W (or its rows `ids`) in `dtype`."""
        if self.precision == "int8":
            q, scale = (self.q, self.scale) if ids is None else (self.q[ids], self.scale[ids])
            return q.to(dtype) * scale.to(dtype)[..., None]
        packed = self.packed if ids is None else self.packed[ids]
        codes = unpack_nibbles(packed)  # [..., K]
        groups = codes.view(*codes.shape[:-1], self.n_in // self.group, self.group)
        if self.precision == "int4":
            sz = self.scales_zeros.transpose(0, 1)  # [N', K/GROUP, 2]
            sz = sz if ids is None else sz[ids]
            w = (groups.to(dtype) - 8) * sz[..., 0:1].to(dtype) + sz[..., 1:2].to(dtype)
        else:
            absmax = self.absmax if ids is None else self.absmax[ids]
            w = NF4_CODES.to(device=codes.device, dtype=dtype)[groups.long()] * absmax.to(dtype)[..., None]
        w = w.view(*codes.shape)
        return w if ids is not None else w[: self.n_out]

    def matmul(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [..., K] @ W.t() (+ bias) -> [..., N], in x's dtype."""
        flat = x.reshape(-1, self.n_in)
        if self.dynamic is not None:  # float32 on the CPU: no casts
            y = int8_kernels.dynamic_matmul(flat, self.dynamic, self.inverse_smooth, self.packed_bias)
            if bias is not None and self.packed_bias is None:
                y = y + bias
            return y.view(*x.shape[:-1], self.n_out)
        if self.inverse_smooth is not None:
            flat = flat * self.inverse_smooth.to(flat.dtype)
        if self.kernel and self.precision == "int8":
            y = torch._weight_int8pack_mm(flat.to(ACT), self.q, self.scale)
        elif self.kernel and self.precision == "int4":
            y = torch._weight_int4pack_mm_for_cpu(flat.to(ACT), self.int4pack, self.group, self.scales_zeros)
            y = y[:, : self.n_out]
        else:
            y = flat @ self.dequantized(dtype=flat.dtype).t()
        y = y.to(x.dtype).view(*x.shape[:-1], self.n_out)
        return y if bias is None else y + bias

    def rows(self, ids: torch.Tensor, dtype) -> torch.Tensor:
        """W[ids] [..., K]: the embedding lookup of a tied matrix."""
        rows = self.dequantized(ids, dtype)
        return rows if self.inverse_smooth is None else rows * self.inverse_smooth.to(dtype)


def _works(probe) -> bool:
    try:
        probe()
        return True
    except (RuntimeError, NotImplementedError):
        return False


class QuantLinear(nn.Module):
    """A Conv1D (y = x @ W + b) whose W is stored in fewer bits."""

    def __init__(self, linear: Conv1D, precision: str, int8_kernel: str = "weight-only",
                 smooth: Optional[torch.Tensor] = None):
        super().__init__()
        self.n_in = linear.n_in
        # Conv1D keeps W as [in, out]
        self.matrix = QuantMatrix(linear.weight.detach().t(), precision, int8_kernel, smooth)
        self.bias = linear.bias

    def forward(self, x):
        return self.matrix.matmul(x, self.bias)


class QuantEmbedding(nn.Module):
    """The token embedding, read from a quantized matrix that the tied LM head multiplies with."""

    def __init__(self, embedding: nn.Embedding, precision: str, int8_kernel: str = "weight-only",
                 smooth: Optional[torch.Tensor] = None):
        super().__init__()
        self.matrix = QuantMatrix(embedding.weight.detach(), precision, int8_kernel, smooth)
        self.matrix.needs_rows = True
        self.dtype = embedding.weight.dtype

    def forward(self, ids):
        return self.matrix.rows(ids, self.dtype)


class QuantLMHead(nn.Module):
    """Next-token logits from the (tied) quantized matrix."""

    def __init__(self, matrix: QuantMatrix, n_in: int):
        super().__init__()
        self.shared = [matrix]  # a list: the tied matrix is registered once, in the embedding
        self.n_in = n_in

    def forward(self, hidden):
        return self.shared[0].matmul(hidden)


class QuantUntiedHead(nn.Module):
    def __init__(self, weight: torch.Tensor, precision: str, int8_kernel: str = "weight-only",
                 smooth: Optional[torch.Tensor] = None):
        super().__init__()
        self.matrix = QuantMatrix(weight.detach(), precision, int8_kernel, smooth)
        self.n_in = weight.shape[1]

    def forward(self, hidden):
        return self.matrix.matmul(hidden)


def quantize(model: GPTWithHead, precision: str, int8_kernel: str = "weight-only") -> None:
    """Replace the body's Conv1D layers, the token embedding and the LM head with `precision` versions.

    The float matrices go: no float copy of a quantized matrix is kept. With the dynamic int8
    kernel, a calibration pass of the float model first finds each product's input-channel
    smoothing scales (smoothing.py).
    """
    precision = precision_name(precision)
    if precision not in QUANTIZED:
        raise ValueError(f"{precision} is not a quantized precision; choose one of {', '.join(QUANTIZED)}")
    if int8_kernel not in int8_kernels.KERNELS:
        raise ValueError(f"unknown int8 kernel {int8_kernel!r}; choose one of {', '.join(int8_kernels.KERNELS)}")
    kernel = int8_kernel if precision == "int8" else "weight-only"
    peaks = smoothing.input_peaks(model) if kernel == "dynamic" else {}

    def smooth(module, weight):  # weight [N, K]
        return smoothing.smoothing_scales(peaks[module], weight) if module in peaks else None

    body = model.transformer
    for parent in list(body.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                setattr(parent, name, QuantLinear(child, precision, kernel, smooth(child, child.weight.detach().t())))
    head = getattr(model, "lm_head", None)
    untied = head.untied if isinstance(head, LMHead) else None
    head_smooth = smooth(head, untied if untied is not None else body.wte.weight) if head is not None else None
    # an untied embedding is only looked up: it needs no product kernel
    body.wte = QuantEmbedding(body.wte, precision, kernel if untied is None else "weight-only",
                              head_smooth if untied is None else None)
    if isinstance(head, LMHead):
        model.lm_head = QuantUntiedHead(untied, precision, kernel, head_smooth) if untied is not None else \
            QuantLMHead(body.wte.matrix, model.config.n_embd)
    model.int8_kernel = kernel if precision == "int8" else None


def prepare(model: nn.Module) -> None:
    """After moving the model to its device: pick the packed kernels that device has."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.matrix.prepare(module.bias)
        elif isinstance(module, QuantMatrix):
            module.prepare()


def int8_kernel_in_use(model: nn.Module) -> Optional[str]:
    """"dynamic", "weight-only" or "dequantize" (no kernel on this device) for an int8 model; None otherwise."""
    matrices = [m for m in model.modules() if isinstance(m, QuantMatrix) and m.precision == "int8"]
    if not matrices:
        return None
    if all(m.dynamic is not None for m in matrices):
        return "dynamic"
    return "weight-only" if all(m.kernel for m in matrices) else "dequantize"


def weight_bytes(model: nn.Module) -> int:
    """Memory of the weights: parameters and buffers, each tensor counted once (tied ones share)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + [b for b in model.buffers() if b is not None]:
        key = (tensor.device, tensor.data_ptr())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total + sum(m.extra_bytes() for m in model.modules() if isinstance(m, QuantMatrix))


def estimated_weight_bytes(config, precision: str, float_bytes: int = 4, int8_kernel: str = "weight-only") -> int:
    """Weight memory of a model at `precision`, from its config alone (no download): what the
    quantized layouts above hold. `float_bytes`: the compute dtype's size for the parts that stay
    float (4 on CPU, 2 on CUDA); `int8_kernel`: the int8 product it is loaded for."""
    d, inner, L = config.n_embd, config.inner_dim, config.n_layer
    body = L * (d * 3 * d + d * d + d * inner + inner * d)  # the Conv1D matrices
    vocab = config.vocab_size * d  # the tied embedding / LM head
    other = config.parameter_count() - body - vocab  # LayerNorms, biases, position embeddings
    name = precision_name(precision)
    if name in FLOATS:
        return (body + vocab + other) * FLOATS[name].itemsize
    outputs = L * (3 * d + d + inner + d) + config.vocab_size  # one scale per output row
    if name == "int8" and int8_kernel == "dynamic":
        # fbgemm's copy of every matrix (and a 32-bit column offset per output), float32 scales, the
        # tied embedding's own codes for row lookups, and a smoothing vector per matrix input
        inputs = L * (d + d + d + inner) + d
        return body + 2 * vocab + 8 * outputs + 4 * inputs + other * float_bytes
    if name == "int8":
        return body + vocab + 2 * outputs + other * float_bytes
    # 4 bits a weight, and per group of inputs two bf16 numbers (int4: scale, zero) or one (nf4: absmax)
    per_group = 4 if name == "int4" else 2
    wide_d = L * (d * 3 * d + d * d + d * inner)  # matrices whose inputs are n_embd wide
    wide_inner = L * inner * d
    copies = 2 if name == "int4" else 1  # int4 keeps the embedding twice: rows to look up, the kernel's layout
    matrices = (body + copies * vocab) // 2 + per_group * (
        (wide_d + copies * vocab) // group_size(d) + wide_inner // group_size(inner))
    return matrices + other * float_bytes
