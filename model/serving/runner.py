"""Running the network on one batch: tensors in, next-token logits out.

A prefill chunk or a decode step becomes input ids and positions, a view of the KV cache
(kv_cache.py), one pass through the body and the LM head; a decode step goes through the
fixed-shape step (decode_graph.py) when the engine has one. Logits come back as float32 on
the CPU, where sampling runs.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..network.gpt import GPTWithHead
from .decode_graph import FixedShapeDecoder
from .kv_cache import KVCache


class ModelRunner:
    def __init__(self, model: GPTWithHead, cache: KVCache, fixed_shape: Optional[FixedShapeDecoder] = None):
        self.model = model
        self.cache = cache
        self.fixed_shape = fixed_shape
        self.device = model.device

    def prefill(self, chunks: Sequence[list[int]], starts: Sequence[int], slots: Sequence[int],
                want_logits: Sequence[int]) -> Optional[torch.Tensor]:
        """Write equal-length chunks of prompt tokens into their slots from `starts`; the logits
        after the last token of the rows listed in `want_logits` ([len, V]), or None."""
        ids = torch.tensor([list(chunk) for chunk in chunks], device=self.device)  # [B, T]
        T = ids.shape[1]
        pos = torch.tensor([list(range(start, start + T)) for start in starts], device=self.device)
        hidden = self.model.transformer(ids, positions=pos, cache=self.cache.view(slots, pos))
        if not want_logits:
            return None
        return self.model.lm_head(hidden[list(want_logits), -1]).float().cpu()

    def decode(self, slots: list[int], tokens: list[int], positions: list[int],
               shared: Sequence[tuple[list[int], int]] = ()) -> torch.Tensor:
        """One token for each row: `tokens[b]` at `positions[b]` of `slots[b]`. Logits [B, V].

        `shared`: groups of rows whose sequences hold the same prompt, read once (kv_cache.CacheView).
        """
        if self.fixed_shape is not None:
            return self.fixed_shape.step(slots, tokens, positions).float().cpu()
        ids = torch.tensor([[t] for t in tokens], device=self.device)  # [B, 1]
        pos = torch.tensor([[p] for p in positions], device=self.device)
        hidden = self.model.transformer(ids, positions=pos, cache=self.cache.view(slots, pos, shared=shared))
        return self.model.lm_head(hidden[:, -1]).float().cpu()

    def fork(self, src: int, dst: int, length: int, suggestion: bool = False) -> None:
        """Make sequence `dst` hold positions [0, length) of `src` (shared blocks, kv_cache.fork)."""
        self.cache.fork(src, dst, length, suggestion)
