"""Loading a checkpoint at a precision: float weights as they are, or quantized at load time.

Quantized models are read from the ordinary safetensors checkpoint in float32 on the CPU, their
matrices replaced by quantized ones (quantize.py), and only then moved to their device, so no
separate quantized files are needed and no float copy of a quantized matrix stays behind.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

import torch

from ..network.config import GPTConfig
from ..network.gpt import GPTWithHead
from ..network.weights import load_folder, load_with_heads, resolve_checkpoint
from . import int8_kernels, quantize
from .heap import trim_heap
from .quantize import FLOATS, QUANTIZED, precision_name

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


CPU_INT8_FROM_PARAMETERS = 500_000_000  # gpt2-large (774 M) and gpt2-xl (1.56 B) load in int8 on a CPU


def default_precision(parameters: Optional[int], device: torch.device) -> str:
    """The precision of a model whose spec names none (nor WWT_DTYPE): float16 on CUDA; on a CPU,
    int8 from CPU_INT8_FROM_PARAMETERS parameters up, float32 below.

    In float32 gpt2-xl needs 6.2 GB of weights and gpt2-large 3.1 GB, and a CPU step reads them all:
    int8 holds a quarter of that, fits a 16 GB host with room for its cache, and decodes several
    times faster, at the fidelity docs/performance.md measures. The smaller sizes keep float32
    and its parity with the reference."""
    if device.type == "cuda":
        return "float16"
    return "int8" if parameters is not None and parameters >= CPU_INT8_FROM_PARAMETERS else "float32"


def checkpoint_parameters(folder: Path) -> Optional[int]:
    """The parameter count of the checkpoint in `folder`, from its config.json (None without one)."""
    try:
        return GPTConfig.from_file(Path(folder) / "config.json").parameter_count()
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve_precision(precision: Union[str, torch.dtype, None], device: torch.device,
                      parameters: Optional[int] = None) -> tuple[str, torch.dtype]:
    """(precision name, float compute dtype): the one named, else `default_precision`."""
    name = precision_name(precision) or default_precision(parameters, device)
    if name in FLOATS:
        return name, FLOATS[name]
    return name, torch.float16 if device.type == "cuda" else torch.float32


def _to_device(modules, device: torch.device, compute: torch.dtype) -> None:
    """Move quantized modules to `device`; float parameters (LayerNorms, biases, small heads) to `compute`."""
    for module in modules:
        module.to(device=device)
        with torch.no_grad():
            for p in module.parameters():
                if p.is_floating_point():
                    p.data = p.data.to(compute)
        for child in module.modules():
            if isinstance(child, quantize.QuantEmbedding):
                child.dtype = compute  # rows come out in the compute dtype
        quantize.prepare(module)


def matrix_shapes(config) -> list[tuple[int, int]]:
    """(outputs, inputs) of every matrix a decode step multiplies with, in model order."""
    d, inner = config.n_embd, config.inner_dim
    return [(3 * d, d), (d, d), (inner, d), (d, inner)] * config.n_layer + [(config.vocab_size, d)]


def int8_kernel_for(config, device: torch.device, choice: str = "auto") -> str:
    """The int8 product to quantize for: `choice`, or ("auto") the faster one here, timed on
    matrices of this model's shapes (int8_kernels.choose). The dynamic kernel runs on CPUs only."""
    if device.type != "cpu":
        return "weight-only"
    if choice != "auto":
        if choice not in int8_kernels.KERNELS:
            raise ValueError(f"unknown int8 kernel {choice!r}; choose auto or one of "
                             f"{', '.join(int8_kernels.KERNELS)}")
        if choice == "dynamic" and not int8_kernels.dynamic_available():
            log.warning("WWT_CPU_INT8=dynamic, but this torch build has no fbgemm: the weight-only kernel runs")
            return "weight-only"
        return choice
    kernel, times = int8_kernels.choose(matrix_shapes(config))
    if times:
        log.info("int8 product: %s (one pass over matrices of this model's shapes: %s)", kernel,
                 ", ".join(f"{name} {ms:.1f} ms" for name, ms in times.items()))
    elif not int8_kernels.dynamic_available():
        log.info("int8 product: weight-only (this torch build has no fbgemm for the int8 x int8 product)")
    return kernel


def _quantize_onto(model: GPTWithHead, heads: list, name: str, device: torch.device, compute: torch.dtype,
                   int8_kernel: str) -> None:
    """Quantize a float32 CPU model to `name` (heads sharing its body use its quantized layers),
    then move it and its heads to `device`, and hand the float matrices' pages back."""
    kernel = int8_kernel_for(model.config, device, int8_kernel) if name == "int8" else "weight-only"
    quantize.quantize(model, name, kernel)
    _to_device([model, *heads], device, compute)
    trim_heap()


def load_with_heads_at(folder: Path, precision, device=None, int8_kernel: str = "auto"
                       ) -> tuple[GPTWithHead, dict, str]:
    """The LM model and the checkpoint's extra heads (sharing its body) at `precision`; and its name.
    `int8_kernel`: see int8_kernel_for."""
    device = torch.device(device) if device is not None else default_device()
    name, compute = resolve_precision(precision, device, checkpoint_parameters(folder))
    if name not in QUANTIZED:
        lm, heads = load_with_heads(folder, dtype=compute, device=device)
        return lm, heads, name
    lm, heads = load_with_heads(folder, dtype=torch.float32, device="cpu")
    _quantize_onto(lm, list(heads.values()), name, device, compute, int8_kernel)
    return lm.eval(), heads, name


def load(name_or_path: str, head: str = "lm", dtype=torch.float32, device=None, revision: Optional[str] = None,
         cache_dir: Optional[str] = None, offline: Optional[bool] = None, int8_kernel: str = "auto") -> GPTWithHead:
    """A GPT model with the given head at precision `dtype` (a torch float dtype, or "float16",
    "int8", "int4", "nf4"...), from a Hub repo id, a short name or a local folder.
    `int8_kernel`: which int8 product (see int8_kernel_for)."""
    folder = resolve_checkpoint(name_or_path, revision, cache_dir, offline)
    device = torch.device(device) if device is not None else default_device()
    name, compute = resolve_precision(dtype, device, checkpoint_parameters(folder))
    if name not in QUANTIZED:
        return load_folder(folder, head, compute, device)
    module = load_folder(folder, head, torch.float32, "cpu")
    _quantize_onto(module, [], name, device, compute, int8_kernel)
    return module.eval()
