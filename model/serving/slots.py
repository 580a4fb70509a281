"""The prefix cache: which tokens each KV-cache slot holds, and which slots a request should use.

A slot's keys/values at positions [0, len(tokens)) are those of `tokens`. A request whose
prompt shares a prefix with a free slot prefills only the rest.

Many documents are typed at once on a public demo, so choosing a slot weighs what the new
prompt reuses against what overwriting the slot destroys: a slot holding another document
that shares only its first word is worth more kept than an empty slot is. After a request,
its n suggestions' slots hold n copies of the same prompt: one is kept as the document's
prefix, the others become spares that are given away first.

A slot still busy can give its prefix too: when a document's next keystroke arrives while its
previous request is still running, the new request's slot copies the keys/values it shares
with the running one's (a copy of memory) instead of prefilling them (donor()).

The planner chooses slots (choose(), which changes nothing); the scheduler reserves them and
records what it writes into them (reserve(), wrote(), appended(), release()).
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
        self._tokens: list[list[int]] = [[] for _ in range(slots)]
        self._busy = [False] * slots
        self._spare = [False] * slots  # holds a copy of what a kept slot holds: free to overwrite
        self._prompt_len = [0] * slots  # how much of a slot is a document's text (the rest: a suggestion)
        self._last_used = [0] * slots
        self._clock = itertools.count(1)

    # -- what the slots hold (read by the scheduler and the tests) -------------------------
    @property
    def size(self) -> int:
        return len(self._tokens)

    def held(self, slot: int) -> list[int]:
        """The tokens whose keys/values slot `slot` holds (a copy)."""
        return list(self._tokens[slot])

    def busy(self) -> list[int]:
        return [i for i, b in enumerate(self._busy) if b]

    def free(self) -> list[int]:
        return [i for i, b in enumerate(self._busy) if not b]

    def holding(self, prefix: list[int]) -> list[int]:
        """Slots whose tokens start with `prefix`."""
        return [i for i, t in enumerate(self._tokens) if t[:len(prefix)] == prefix]

    # -- the scheduler's bookkeeping ---------------------------------------------------------
    def wrote(self, slot: int, tokens: list[int]) -> None:
        """The slot's keys/values are now those of `tokens`, a document's prompt (a prefill or a fork)."""
        self._tokens[slot] = list(tokens)
        self._prompt_len[slot] = len(tokens)

    def appended(self, slot: int, token: int) -> None:
        """A decode step wrote one more token of a suggestion into the slot."""
        self._tokens[slot].append(token)

    def shared_with(self, slot: int, tokens: list[int]) -> int:
        """How many leading tokens of `tokens` the slot already holds."""
        return common_prefix(self._tokens[slot], tokens)

    # -- choosing slots ----------------------------------------------------------------------
    def _lost(self, slot: int, prompt: list[int]) -> int:
        """Document tokens that writing `prompt` into `slot` destroys (a finished suggestion's tokens
        count for nothing: the next keystroke asks for new ones)."""
        if self._spare[slot]:
            return 0
        return max(0, self._prompt_len[slot] - common_prefix(self._tokens[slot], prompt))

    def _base_choice(self, free: list[int], prompt: list[int]) -> int:
        """The slot to prefill `prompt` into.

        Best is the slot whose reuse outweighs what it destroys (the same document, typed on or
        edited near its end). Else a slot that destroys nothing (empty or a spare), the one that
        reuses most. Else the least recently used document is evicted.
        """
        cap = len(prompt) - 1  # at least one token is prefilled, for the next-token logits
        reuse = {i: min(common_prefix(self._tokens[i], prompt), cap) for i in free}
        lost = {i: self._lost(i, prompt) for i in free}
        gain = {i: reuse[i] - lost[i] for i in free}
        positive = [i for i in free if gain[i] > 0]
        if positive:
            return max(positive, key=lambda i: (gain[i], -self._last_used[i]))
        harmless = [i for i in free if lost[i] == 0]
        if harmless:
            return max(harmless, key=lambda i: (reuse[i], -self._last_used[i]))
        return min(free, key=lambda i: (self._last_used[i], -reuse[i]))

    def choose(self, prompt: list[int], n: int, taken=()) -> Optional[tuple[list[int], int]]:
        """The `n` free slots, besides those in `taken`, that `prompt` would get: (slots, the base
        first; tokens the base already holds) or None. Changes nothing: reserve() does.

        The base holds the prefill; the others are forked from it, copying only what they do not
        already share with the prompt, so they are chosen among slots that destroy nothing first,
        then least recently used.
        """
        free = [i for i in self.free() if i not in taken]
        if len(free) < n:
            return None
        base = self._base_choice(free, prompt)

        def fork_order(i: int) -> tuple:
            shared = common_prefix(self._tokens[i], prompt)
            if self._lost(i, prompt):
                return 1, self._last_used[i], -shared
            return 0, -shared, self._last_used[i]

        chosen = [base] + sorted((i for i in free if i != base), key=fork_order)[:n - 1]
        return chosen, min(common_prefix(self._tokens[base], prompt), len(prompt) - 1)

    def reserve(self, slots: list[int], reused: int) -> None:
        """Make `slots` (from choose) busy; the base keeps only the `reused` tokens of the prompt."""
        for i in slots:
            self._busy[i] = True
            self._spare[i] = False
        base = slots[0]
        self._tokens[base] = self._tokens[base][:reused]
        self._prompt_len[base] = min(self._prompt_len[base], reused)

    def acquire(self, prompt: list[int], n: int) -> Optional[tuple[list[int], int]]:
        """choose() and reserve() at once (the tests' shorthand)."""
        got = self.choose(prompt, n)
        if got is not None:
            self.reserve(*got)
        return got

    def donor(self, prompt: list[int], base: int) -> Optional[tuple[int, int]]:
        """A slot, busy or not, holding a longer prefix of `prompt` than `base` (just reserved for
        it) does: (that slot, the tokens to copy from it into `base`), or None."""
        cap = len(prompt) - 1
        shared = {i: min(common_prefix(t, prompt), cap) for i, t in enumerate(self._tokens) if i != base}
        best = max(shared, key=shared.get, default=None)
        if best is None or shared[best] <= common_prefix(self._tokens[base], prompt):
            return None
        return best, shared[best]

    def release(self, slots: list[int], keep: Optional[int] = None) -> None:
        """The request is done. `keep` (default: the first slot) stays as its document's prefix;
        the other slots hold copies of the same prompt and become spares, overwritten first."""
        keep = slots[0] if keep is None and slots else keep
        now = next(self._clock)
        for i in slots:
            self._busy[i] = False
            self._spare[i] = i != keep and bool(self._tokens[i])
            self._last_used[i] = now if i == keep else 0
