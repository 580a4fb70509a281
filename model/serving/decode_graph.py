"""The decode step at fixed shapes, captured once as a CUDA graph and replayed every step.

A fixed number of rows decode one token per step whether they have a live row or not, each
through a block table as wide as the context, so the shapes never change and the whole step
(all layers, the LM head) is one graph launch instead of hundreds of kernel launches. The
tables, token ids and positions are the graph's inputs, rewritten before each replay. On CPU
the same fixed-shape step runs eagerly, which is how it is tested against the ordinary path.
"""

from __future__ import annotations

import torch

from ..network.gpt import GPTWithHead
from .kv_cache import KVCache


class FixedShapeDecoder:
    def __init__(self, model: GPTWithHead, cache: KVCache, rows: int, capture: bool):
        self.model = model
        self.cache = cache
        self.rows = rows
        device = cache.k.device
        self.parking = cache.blocks.set_aside()  # idle rows read and write here; never a real token
        width = cache.blocks.blocks_for(cache.context)
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.tables = torch.full((rows, width), self.parking, dtype=torch.long, device=device)
        self.graph = None
        self.logits = None
        if capture:
            self._capture()

    def _forward(self) -> torch.Tensor:
        view = self.cache.fixed_rows(self.tables, self.positions)
        hidden = self.model.transformer(self.ids, positions=self.positions, cache=view)
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
    def step(self, handles: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Logits [len(handles), V] for the given rows (at most `rows`); the others idle."""
        if len(handles) > self.rows:
            raise ValueError(f"{len(handles)} rows in a step of {self.rows}")
        blocks = self.cache.blocks
        tables = torch.full(self.tables.shape, self.parking, dtype=torch.long)
        for r, (h, p) in enumerate(zip(handles, positions)):
            self.cache.writable(h, p, p + 1)
            table = blocks.tables[h]
            tables[r, :len(table)] = torch.tensor(table)
        n, device = len(handles), self.ids.device
        self.tables.copy_(tables.to(device))
        self.ids.zero_()
        self.positions.zero_()
        self.ids[:n, 0] = torch.tensor(tokens, device=device)
        self.positions[:n, 0] = torch.tensor(positions, device=device)
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._forward()
        return logits[:n]
