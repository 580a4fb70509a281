"""The prefix cache: which tokens each sequence holds, and which sequences a request should use.

A slot is a sequence handle: its positions live in blocks of the KV pool (blocks.py), as many
as its tokens need. A slot's keys/values at positions [0, len(tokens)) are those of `tokens`.
A request whose prompt continues a held document prefills only the rest.

Many documents are typed at once on a public demo. A request takes its document's own slot when
one is held (the same document typed on, or edited near its end), else an empty one: a slot
holding another document that shares only a first word is never overwritten; the new document
shares that document's common full blocks instead (donor(), below). After a request, its first
slot stays as the document's prefix; the other suggestions' slots are emptied, their blocks freed.

When the pool has no room, held documents are evicted by a policy (eviction.py) that keeps a
stable set warm when more documents are typed in turn than fit, instead of evicting each just
before its turn. A slot still busy can give its prefix too: when a document's next keystroke
arrives while its previous request is still running, the new request shares the keys/values it
has in common with the running one's (donor()).

The planner chooses slots (choose(), which changes nothing); the scheduler reserves them and
records what it writes into them (reserve(), wrote(), appended(), release()).
"""

from __future__ import annotations

from typing import Optional

from .blocks import BlockTables
from .eviction import POLICIES, same_document


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SlotPool:
    def __init__(self, slots: int, blocks: Optional[BlockTables] = None, rows: Optional[int] = None,
                 eviction: str = "next-use"):
        self._tokens: list[list[int]] = [[] for _ in range(slots)]
        self._busy = [False] * slots
        self._prompt_len = [0] * slots  # how much of a slot is a document's text (the rest: a suggestion)
        self._last_used = [0] * slots  # the clock when its document's last request ended
        self._gap: list[Optional[int]] = [None] * slots  # between its document's last two requests
        self._now = 0  # requests ended so far: the eviction policy's clock
        self.rows = rows or slots  # slots busy at once: the rows a step may run
        self.policy = POLICIES[eviction]()
        self.evictions = 0
        self.blocks = blocks  # the KV pool's block tables, None for bookkeeping alone (tests)
        if blocks is not None:
            blocks.reclaim = self.evict_one

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

    def documents(self) -> int:
        """Documents held for reuse: slots not busy that hold tokens."""
        return len(self.document_slots())

    def document_slots(self) -> list[int]:
        """The slots of the documents held for reuse."""
        return [i for i, t in enumerate(self._tokens) if t and not self._busy[i]]

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

    # -- choosing slots ----------------------------------------------------------------------
    def _document(self, slot: int) -> list[int]:
        return self._tokens[slot][:self._prompt_len[slot]]

    def _same_document(self, free: list[int], prompt: list[int]) -> Optional[int]:
        """The free slot holding the document `prompt` continues (typed on, or edited near its end),
        the one that reuses most; None if none does."""
        best, best_reuse = None, 0
        for i in free:
            if not self._tokens[i]:
                continue
            common = common_prefix(self._tokens[i], prompt)
            if common > best_reuse and same_document(self._document(i), prompt, min(common, self._prompt_len[i])):
                best, best_reuse = i, common
        return best

    def _victim(self, candidates: list[int]) -> int:
        """An empty slot among `candidates` if there is one, else the held document the policy evicts."""
        held = [i for i in candidates if self._tokens[i]]
        if len(held) < len(candidates):
            return next(i for i in candidates if not self._tokens[i])
        return self.policy.victim(held, self._now, self._last_used.__getitem__, self._gap.__getitem__)

    def choose(self, prompt: list[int], n: int, taken=(), budget: Optional[int] = None,
               max_new_tokens: int = 0) -> Optional[tuple[list[int], int]]:
        """The `n` free slots, besides those in `taken`, that `prompt` would get: (slots, the base
        first; tokens the base already holds) or None. Changes nothing: reserve() does.

        The base is the document's own slot, else an empty one (else the policy's victim); the
        others are empty slots for the forked suggestions. With block tables, `budget` is the
        blocks the running requests have not claimed: None is returned when this request's blocks
        (prompt and `max_new_tokens` for each suggestion) would not fit in it with what eviction frees.
        """
        if len(self.busy()) + len(taken) + n > self.rows:
            return None
        free = [i for i in self.free() if i not in taken]
        if len(free) < n:
            return None
        base = self._same_document(free, prompt)
        reused = 0  # a new document: its empty slot (or a victim) keeps nothing
        if base is None:
            base = self._victim(free)
        else:
            reused = min(common_prefix(self._tokens[base], prompt), len(prompt) - 1)
        others = [i for i in free if i != base]
        chosen = [base]
        for _ in range(n - 1):
            pick = self._victim(others)
            others.remove(pick)
            chosen.append(pick)
        if budget is not None and self.blocks is not None:
            if self.blocks_needed(len(prompt), max_new_tokens, n, reused) > budget - self._claimed(chosen, taken):
                return None
        return chosen, reused

    def blocks_needed(self, prompt_len: int, max_new_tokens: int, n: int, reused: int) -> int:
        """Blocks a request may take at most: its prompt past the `reused` full blocks and its
        suggestions, each forked suggestion sharing the prompt's full blocks."""
        bs, end = self.blocks.block_size, self.blocks.blocks_for(prompt_len + max_new_tokens)
        return end - reused // bs + (n - 1) * (end - prompt_len // bs)

    def _claimed(self, chosen: list[int], taken) -> int:
        """Blocks not free that no eviction can free once `chosen` and `taken` are busy too."""
        pinned = self.blocks.busy_blocks(self.busy() + list(taken) + chosen)
        return len(pinned)

    def reserve(self, slots: list[int], reused: int, prompt: list[int]) -> None:
        """Make `slots` (from choose for `prompt`) busy; the base keeps only the `reused` tokens of
        the prompt, the others are emptied. The base's document brings its pace to the eviction
        policy: from its own slot, or, for a document held before and evicted, from its ghost."""
        for i in slots:
            if i != slots[0] and self._tokens[i]:
                self._evict(i)
            self._busy[i] = True
        base = slots[0]
        if reused and self._tokens[base]:  # its own document again: a gap between two requests
            self._gap[base] = self._now - self._last_used[base]
        else:
            if self._tokens[base]:
                self._evict(base)
            ghost = self.policy.recall(prompt, common_prefix)
            self._gap[base] = None if ghost is None else self._now - ghost.last_used
        self._tokens[base] = self._tokens[base][:reused]
        self._prompt_len[base] = min(self._prompt_len[base], reused)
        if self.blocks is not None:
            self.blocks.truncate(base, reused)

    def acquire(self, prompt: list[int], n: int) -> Optional[tuple[list[int], int]]:
        """choose() and reserve() at once (the tests' shorthand)."""
        got = self.choose(prompt, n)
        if got is not None:
            self.reserve(*got, prompt)
        return got

    def donor(self, prompt: list[int], base: int) -> Optional[tuple[int, int]]:
        """A slot, busy or not, holding a longer prefix of `prompt` than `base` (just reserved for
        it) does: (that slot, the tokens to share from it into `base`), or None."""
        cap = len(prompt) - 1
        mine = common_prefix(self._tokens[base], prompt)
        best, shared = None, mine
        for i, t in enumerate(self._tokens):
            if i != base and t and t[0] == prompt[0]:
                common = min(common_prefix(t, prompt), cap)
                if common > shared:
                    best, shared = i, common
        return None if best is None else (best, shared)

    def release(self, slots: list[int], keep: Optional[int] = None) -> None:
        """The request is done. `keep` (default: the first slot) stays as its document's prefix;
        the other slots hold copies of the same prompt and are emptied."""
        keep = slots[0] if keep is None and slots else keep
        self._now += 1
        for i in slots:
            self._busy[i] = False
            if i == keep:
                self._last_used[i] = self._now
            else:
                self._empty(i)

    # -- eviction ----------------------------------------------------------------------------
    def evict_one(self) -> bool:
        """Evict the policy's victim among the documents held idle; False if none is."""
        held = [i for i, t in enumerate(self._tokens) if t and not self._busy[i]]
        if not held:
            return False
        self._evict(self.policy.victim(held, self._now, self._last_used.__getitem__, self._gap.__getitem__))
        return True

    def _evict(self, slot: int) -> None:
        self.policy.forget(self._document(slot), self._last_used[slot], self._gap[slot])
        self.evictions += 1
        self._empty(slot)

    def _empty(self, slot: int) -> None:
        self._tokens[slot] = []
        self._prompt_len[slot] = 0
        self._gap[slot] = None
        if self.blocks is not None:
            self.blocks.drop(slot)
