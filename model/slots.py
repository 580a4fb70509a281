"""The prefix cache: which tokens each KV-cache slot holds, and which slot a request should use.

A slot's keys/values at positions [0, len(tokens)) are those of `tokens`. A request
whose prompt shares a prefix with a free slot prefills only the rest; slots no request
holds are overwritten least recently used first.
"""

from __future__ import annotations

import itertools
from typing import Optional


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SlotPool:
    def __init__(self, slots: int):
        self.tokens: list[list[int]] = [[] for _ in range(slots)]
        self.busy = [False] * slots
        self.last_used = [0] * slots
        self._clock = itertools.count(1)

    def __len__(self) -> int:
        return len(self.tokens)

    def free(self) -> list[int]:
        return [i for i, b in enumerate(self.busy) if not b]

    def acquire(self, prompt: list[int], n: int) -> Optional[tuple[list[int], int]]:
        """Reserve `n` slots for `prompt`: (slots, best first, tokens the first already holds) or None.

        The first slot holds the prefill; the others are forked from it, copying only what
        they do not already share with the prompt.
        """
        free = self.free()
        if len(free) < n:
            return None
        # Most of the prompt first; among equals, the least recently used (it is evicted).
        ranked = sorted(free, key=lambda i: (-common_prefix(self.tokens[i], prompt), self.last_used[i]))
        chosen = ranked[:n]
        for i in chosen:
            self.busy[i] = True
        reuse = min(common_prefix(self.tokens[chosen[0]], prompt), len(prompt) - 1)
        self.tokens[chosen[0]] = self.tokens[chosen[0]][:reuse]
        return chosen, reuse

    def release(self, slots: list[int]) -> None:
        for i in slots:
            self.busy[i] = False
            self.last_used[i] = next(self._clock)
