"""Plain generation with the static cache: one prompt, N continuations that share one prefill.

The engine (engine.py) adds scheduling, prefix reuse and autocomplete rules on top; this
is the simple path the reference's `generate` is compared with.
"""

from __future__ import annotations

from typing import Optional

import torch

from .gpt import GPTModel, KVCache
from .sampling import SamplingSettings, apply_repetition_penalty, sample_rows


@torch.inference_mode()
def generate(module: GPTModel, prompt_ids: list[int], max_new_tokens: int, n: int = 1, greedy: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             seed: Optional[int] = None, eos_token_id: Optional[int] = None) -> list[list[int]]:
    """New token ids of `n` continuations of `prompt_ids`.

    The prompt is prefilled once into slot 0 and forked into the other slots. Continuation
    i samples with its own generator seeded `seed + i`; greedy continuation i starts from
    the i-th most likely first token, so the n greedy continuations differ.
    """
    if not prompt_ids:
        raise ValueError("generate needs at least one prompt token")
    config = module.config
    device = module.transformer.wte.weight.device
    total = len(prompt_ids) + max_new_tokens
    if total > config.n_positions:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens + {max_new_tokens} new tokens is past the "
                         f"context of {config.n_positions}")
    settings = SamplingSettings(greedy, temperature, top_k, top_p, repetition_penalty)
    cache = KVCache(config, n, context=total, dtype=module.transformer.wte.weight.dtype, device=device)
    gens = []
    for i in range(n):
        g = torch.Generator(device="cpu")
        g.manual_seed((seed if seed is not None else torch.seed()) + i)
        gens.append(g)

    prompt = torch.tensor([prompt_ids], device=device)
    hidden = module.transformer(prompt, cache=cache, slots=[0], positions=torch.arange(len(prompt_ids),
                                                                                       device=device)[None])
    last = module.lm_head(hidden[:, -1]).float().cpu()  # [1, V]
    for i in range(1, n):
        cache.copy_slot(0, i, len(prompt_ids))
    outputs = [[] for _ in range(n)]
    live = list(range(n))
    logits = last.expand(n, -1)
    step = 0
    while live and step < max_new_tokens:
        scores = logits.clone()
        for row, i in enumerate(live):
            history = torch.tensor(prompt_ids + outputs[i], dtype=torch.long)
            scores[row] = apply_repetition_penalty(scores[row], history, repetition_penalty)
        chosen = sample_rows(scores, [settings] * len(live), [gens[i] for i in live],
                             [i if step == 0 else 0 for i in live])
        for i, tok in zip(live, chosen):
            outputs[i].append(tok)
        step += 1
        keep = [(i, t) for i, t in zip(live, chosen) if t != eos_token_id]
        live = [i for i, _ in keep]
        if not live or step >= max_new_tokens:
            break
        ids = torch.tensor([[t] for _, t in keep], device=device)
        pos = torch.tensor([[len(prompt_ids) + step - 1]] * len(live), device=device)
        hidden = module.transformer(ids, cache=cache, slots=live, positions=pos)
        logits = module.lm_head(hidden[:, -1]).float().cpu()
    return outputs
