"""Loading a checkpoint at a precision: float weights as they are, or quantized at load time.

Quantized models are read from the ordinary safetensors checkpoint in float32 on the CPU, their
matrices replaced by quantized ones (quantize.py), and only then moved to their device, so no
separate quantized files are needed and no float copy of a quantized matrix stays behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from ..network.gpt import GPTWithHead
from ..network.weights import load_folder, load_with_heads, resolve_checkpoint
from . import quantize
from .quantize import FLOATS, QUANTIZED, precision_name


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(precision: Union[str, torch.dtype, None], device: torch.device) -> tuple[str, torch.dtype]:
    """(precision name, float compute dtype): float16 on CUDA and float32 on CPU unless named."""
    name = precision_name(precision) or ("float16" if device.type == "cuda" else "float32")
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


def load_with_heads_at(folder: Path, precision, device=None) -> tuple[GPTWithHead, dict, str]:
    """The LM model and the checkpoint's extra heads (sharing its body) at `precision`; and its name."""
    device = torch.device(device) if device is not None else default_device()
    name, compute = resolve_precision(precision, device)
    if name not in QUANTIZED:
        lm, heads = load_with_heads(folder, dtype=compute, device=device)
        return lm, heads, name
    lm, heads = load_with_heads(folder, dtype=torch.float32, device="cpu")
    quantize.quantize(lm, name)  # the body is shared: the heads use the quantized layers too
    _to_device([lm, *heads.values()], device, compute)
    return lm.eval(), heads, name


def load(name_or_path: str, head: str = "lm", dtype=torch.float32, device=None, revision: Optional[str] = None,
         cache_dir: Optional[str] = None, offline: Optional[bool] = None) -> GPTWithHead:
    """A GPT model with the given head at precision `dtype` (a torch float dtype, or "float16",
    "int8", "int4", "nf4"...), from a Hub repo id, a short name or a local folder."""
    folder = resolve_checkpoint(name_or_path, revision, cache_dir, offline)
    device = torch.device(device) if device is not None else default_device()
    name, compute = resolve_precision(dtype, device)
    if name not in QUANTIZED:
        return load_folder(folder, head, compute, device)
    module = load_folder(folder, head, torch.float32, "cpu")
    quantize.quantize(module, name)
    _to_device([module], device, compute)
    return module.eval()
