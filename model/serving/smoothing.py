"""Smoothing the input channels of int8 products whose activations are quantized too (SmoothQuant).

A trained GPT-2's residual stream has a few channels far larger than the rest in every token.
With one activation scale per token, such a channel takes the whole int8 range and leaves the
other channels a handful of levels. SmoothQuant moves that range into the weights: the product
takes x / s and the weight's input column j is multiplied by s_j, which changes nothing in exact
arithmetic, with s_j = sqrt(max|x_j| / max|W_j|) (its α = 0.5).

max|x_j| comes from one short calibration pass of the float model, before it is quantized:
a fixed pseudo-random sequence of token ids, so the scales depend on the checkpoint alone.
Outlier channels are a property of the weights (they appear whatever the text), which is what
the calibration needs to see.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..network.gpt import Conv1D, GPTWithHead

CALIBRATION_TOKENS = 64
ALPHA = 0.5
FLOOR = 1e-5


@torch.inference_mode()
def input_peaks(model: GPTWithHead) -> dict[nn.Module, torch.Tensor]:
    """{linear layer: max |input| per input channel}, for every Conv1D of the body and for the LM
    head (keyed by the model's `lm_head` module), from one causal pass over CALIBRATION_TOKENS ids."""
    config = model.config
    generator = torch.Generator().manual_seed(0)
    length = min(CALIBRATION_TOKENS, config.n_positions)
    ids = torch.randint(0, config.vocab_size, (1, length), generator=generator, device="cpu")
    peaks: dict[nn.Module, torch.Tensor] = {}

    def record(module, inputs):
        x = inputs[0].detach().float()
        peak = x.abs().reshape(-1, x.shape[-1]).amax(dim=0)
        peaks[module] = torch.maximum(peaks[module], peak) if module in peaks else peak

    hooks = [m.register_forward_pre_hook(record) for m in model.transformer.modules() if isinstance(m, Conv1D)]
    try:
        hidden = model.transformer(ids.to(model.device))
    finally:
        for hook in hooks:
            hook.remove()
    if getattr(model, "lm_head", None) is not None:
        peaks[model.lm_head] = hidden.detach().float().abs().reshape(-1, hidden.shape[-1]).amax(dim=0)
    return peaks


def smoothing_scales(input_peak: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """s [K] for a weight [N, K] (rows = outputs) whose inputs peak at `input_peak` [K]."""
    weight_peak = weight.float().abs().amax(dim=0).clamp(min=FLOOR)
    return (input_peak.clamp(min=FLOOR) ** ALPHA / weight_peak ** (1 - ALPHA)).clamp(min=FLOOR)
