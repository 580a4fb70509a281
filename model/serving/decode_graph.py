"""The decode step at fixed shapes, captured once as a CUDA graph and replayed every step.

Every slot decodes one token per step whether it has a live row or not, so the shapes
never change and the whole step (all layers, the LM head) is one graph launch instead of
hundreds of kernel launches. On CPU the same fixed-shape step runs eagerly, which is how
it is tested against the ordinary path.
"""

from __future__ import annotations

import torch

from ..network.gpt import GPTWithHead
from .kv_cache import KVCache


class FixedShapeDecoder:
    def __init__(self, model: GPTWithHead, cache: KVCache, capture: bool):
        self.model = model
        self.cache = cache
        device = cache.k.device
        self.parking = cache.context - 1  # where idle slots write; never holds a real token
        self.ids = torch.zeros(cache.slots, 1, dtype=torch.long, device=device)
        self.positions = torch.full((cache.slots, 1), self.parking, dtype=torch.long, device=device)
        self.graph = None
        self.logits = None
        if capture:
            self._capture()

    def _forward(self) -> torch.Tensor:
        hidden = self.model.transformer(self.ids, positions=self.positions, cache=self.cache.all_slots(self.positions))
        return self.model.lm_head(hidden[:, -1])

    @torch.inference_mode()
    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up kernels and allocator outside the graph
            for _ in range(3):
                self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()
        self.cache.k.zero_()
        self.cache.v.zero_()

    @torch.inference_mode()
    def step(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Logits [len(slots), V] for the given rows; every other slot idles at the parking position."""
        device = self.ids.device
        index = torch.tensor(slots, device=device)
        self.ids.zero_()
        self.positions.fill_(self.parking)
        self.ids[index, 0] = torch.tensor(tokens, device=device)
        self.positions[index, 0] = torch.tensor(positions, device=device)
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._forward()
        return logits[index]
