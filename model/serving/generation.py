"""Plain generation over the same parts the engine uses: one prompt, N continuations that share one prefill.

A short driver over the runner (runner.py) and sampling, without scheduling, prefix reuse or
autocomplete rules: the path the tests compare with the reference's `generate`.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..network.gpt import GPTWithHead
from .kv_cache import KVCache
from .runner import ModelRunner
from .sampling import SamplingSettings, apply_repetition_penalty, sample_rows


@torch.inference_mode()
def generate(module: GPTWithHead, prompt_ids: list[int], max_new_tokens: int, n: int = 1, greedy: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             seed: Optional[int] = None, eos_token_id: Optional[int] = None) -> list[list[int]]:
    """New token ids of `n` continuations of `prompt_ids`.

    The prompt is prefilled once into sequence 0 and forked into the others (sharing its blocks). Continuation
    i samples with its own generator seeded `seed + i`; greedy continuation i starts from
    the i-th most likely first token, so the n greedy continuations differ.
    """
    if not prompt_ids:
        raise ValueError("generate needs at least one prompt token")
    config = module.config
    device = module.device
    total = len(prompt_ids) + max_new_tokens
    if total > config.n_positions:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens + {max_new_tokens} new tokens is past the "
                         f"context of {config.n_positions}")
    settings = SamplingSettings(greedy, temperature, top_k, top_p, repetition_penalty)
    cache = KVCache(config, n, context=total, dtype=module.transformer.wpe.weight.dtype, device=device)
    runner = ModelRunner(module, cache)
    base = seed if seed is not None else torch.seed()
    gens = [torch.Generator(device="cpu").manual_seed(base + i) for i in range(n)]
    logits = runner.prefill([prompt_ids], [0], [0], want_logits=[0]).expand(n, -1)  # [n, V]
    for i in range(1, n):
        runner.fork(0, i, len(prompt_ids), suggestion=True)
    outputs: list[list[int]] = [[] for _ in range(n)]
    live = list(range(n))
    for step in range(max_new_tokens):
        scores = logits.clone()
        for row, i in enumerate(live):
            history = torch.tensor(prompt_ids + outputs[i], dtype=torch.long)
            scores[row] = apply_repetition_penalty(scores[row], history, repetition_penalty)
        chosen = sample_rows(scores, [settings] * len(live), [gens[i] for i in live],
                             [i if step == 0 else 0 for i in live])
        for i, token in zip(live, chosen):
            outputs[i].append(token)
        keep = [(i, t) for i, t in zip(live, chosen) if t != eos_token_id]
        live = [i for i, _ in keep]
        if not live or step + 1 >= max_new_tokens:
            break
        logits = runner.decode(live, [t for _, t in keep], [len(prompt_ids) + step] * len(live))
    return outputs
