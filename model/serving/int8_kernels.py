"""The two CPU products of an int8 matrix, and the choice between them, made by timing at load.

- "weight-only": torch's `_weight_int8pack_mm`. Activations are cast to bfloat16 and each weight
  is widened to bfloat16 in the kernel. Fast where the CPU multiplies bfloat16 natively
  (AVX-512 BF16, AMX); elsewhere the casts cost more than the product reads.
- "dynamic": int8 × int8 with activations quantized on the fly (fbgemm's `quantized::linear_dynamic`:
  AVX2 or AVX-512, VNNI where present). Activations stay float32 on both sides of the call.
  fbgemm quantizes its input with one scale per call, so each row is first divided by its own
  largest magnitude: the product then has one scale per token. A channel that is large in
  every token (GPT-2's residual stream has a few) would still take the whole range of every
  row, so the input channels are smoothed first (SmoothQuant): x / s enters the product and the
  weights' input columns are multiplied by s, with s = sqrt(max|x_j| / max|W_j|) from a short
  calibration pass (smoothing.py). fbgemm's activations are 7-bit ("reduce range") so that its
  AVX2 kernel's 16-bit pair sums cannot saturate.

Both kernels read one byte per weight. Which streams faster depends on the CPU's instructions,
so `choose` times both over matrices of the model's own shapes, as kernel_choice.py does for
float32, and the loader quantizes for the winner.
"""

from __future__ import annotations

import itertools
import statistics
import time
import warnings
from typing import Optional, Sequence

import torch

from .heap import trim_heap

KERNELS = ("weight-only", "dynamic")
ACT = torch.bfloat16  # activations of the weight-only kernel
SWEEP_BYTES = 128 << 20  # timing matrices: more than any last-level cache, so they come from memory
MIN_TIMED_BYTES = 32 << 20  # smaller models are not timed (see `choose`)


def dynamic_available() -> bool:
    """Whether this torch build has fbgemm's dynamic int8 product (x86 builds do)."""
    return hasattr(torch.ops, "quantized") and hasattr(torch.ops.quantized, "linear_dynamic") and \
        any(engine in torch.backends.quantized.supported_engines for engine in ("x86", "fbgemm"))


def pack_dynamic(q: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None):
    """q int8 [N, K] with one float scale per row (and the layer's bias, which the kernel adds)
    -> fbgemm's packed weight (None where it fails).

    fbgemm takes its weights as a quantized tensor; torch marks the constructor deprecated, which
    says nothing about this build, so that warning is silenced here and a build without the
    call falls back to the weight-only kernel."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(
                q.contiguous(), scale.double(), torch.zeros(q.shape[0], dtype=torch.long), 0)
            return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.detach().float())
    except (RuntimeError, NotImplementedError, AttributeError):
        return None


def dynamic_matmul(x: torch.Tensor, packed, inverse_smooth: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [M, K] float32 -> x @ W.t() (+ the bias packed with W) [M, N] float32, with one activation
    scale per row (see the module doc). `bias`: the bias packed with W, which the rescaling needs.

    fbgemm takes its activation range from the smallest and largest value of the whole call. Each
    row is divided by its largest magnitude, and one row holding +1 and -1 is added, so the range
    is [-1, 1] in every call: a row's result does not depend on the rows it is batched with (a
    suggestion is the same alone, beside others, or in the fixed-shape step)."""
    if inverse_smooth is not None:
        x = x * inverse_smooth
    peak = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12)
    y = torch.ops.quantized.linear_dynamic(torch.cat([x / peak, _range_row(x.shape[1])]), packed, True)[:-1]
    return y.mul_(peak) if bias is None else torch.addcmul(bias, y.sub_(bias), peak)


_RANGE_ROWS: dict[int, torch.Tensor] = {}


def _range_row(width: int) -> torch.Tensor:
    """[1, width]: +1, -1 and zeros (see dynamic_matmul)."""
    row = _RANGE_ROWS.get(width)
    if row is None:
        row = torch.zeros(1, width)
        row[0, 0], row[0, -1] = 1.0, -1.0
        _RANGE_ROWS[width] = row
    return row


def weight_only_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch._weight_int8pack_mm(x.to(ACT), q, scale).to(x.dtype)


def _timing_shapes(shapes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The model's matrix shapes (N, K) in model order, repeated up to SWEEP_BYTES of int8."""
    picked, total = [], 0
    for shape in itertools.cycle(shapes):
        if total >= SWEEP_BYTES:
            return picked
        picked.append(shape)
        total += shape[0] * shape[1]
    return picked


@torch.inference_mode()
def choose(shapes: Sequence[tuple[int, int]], trials: int = 5) -> tuple[str, dict[str, float]]:
    """(kernel, {kernel: ms per sweep}): the faster int8 product here, one row at a time, timed on
    random int8 matrices of the model's shapes (N outputs, K inputs) before the model is quantized.

    The candidates take turns within each trial, so a change in the machine's load hits them alike;
    the median decides. Without fbgemm (or where a kernel fails) the weight-only kernel is used.
    A model under MIN_TIMED_BYTES is not timed: its products are a small part of its step, and
    the timing would cost more than it decides; it takes the dynamic kernel where there is one
    (row-independent rescaling, float32 activations throughout).
    """
    kinds = ["weight-only"] + (["dynamic"] if dynamic_available() else [])
    if len(kinds) == 1 or not shapes:
        return "weight-only", {}
    if sum(n * k for n, k in shapes) < MIN_TIMED_BYTES:
        return "dynamic", {}
    try:
        median = _time_kernels(kinds, _timing_shapes(list(shapes)), trials)
    except (RuntimeError, NotImplementedError):
        return "weight-only", {}
    finally:
        trim_heap()  # the timing matrices were many; give their pages back
    if not median:
        return "weight-only", {}
    return min(kinds, key=median.__getitem__), median


def _time_kernels(kinds: list[str], shapes: list[tuple[int, int]], trials: int) -> dict[str, float]:
    """{kernel: median ms of one sweep over `shapes`}: one int8 buffer cut into the matrices."""
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (sum(n * k for n, k in shapes),), dtype=torch.int8, generator=generator)
    mats, at = [], 0
    for n, k in shapes:
        q = codes[at:at + n * k].view(n, k)
        at += n * k
        scale = torch.full((n,), 0.01)
        packed = pack_dynamic(q, scale) if "dynamic" in kinds else None
        if "dynamic" in kinds and packed is None:
            return {}
        mats.append((q, scale.to(ACT), packed, torch.ones(1, k)))
    runs = {"weight-only": lambda: [weight_only_matmul(x, q, s) for q, s, _, x in mats],
            "dynamic": lambda: [dynamic_matmul(x, p, None) for _, _, p, x in mats]}
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(trials + 1):  # the first round warms up
        for kind in kinds:
            start = time.perf_counter()
            runs[kind]()
            times[kind].append(time.perf_counter() - start)
    return {kind: statistics.median(t[1:]) * 1000 for kind, t in times.items()}
