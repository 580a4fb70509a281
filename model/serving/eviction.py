"""Which held document to evict when the KV cache is full.

Least recently used keeps nothing when more documents are typed in turn than fit: each one is
evicted just before its turn comes again. So the cache predicts when each document will next be
typed and evicts the one expected last (an online guess at Belady's rule):

- a document's pace is the gap between its last two keystrokes (the clock counts finished
  requests), remembered for a while after it is evicted (a "ghost", as ARC keeps), so a document
  that comes back brings its pace with it;
- its next keystroke is expected one gap after its last; one already overdue is expected as
  late again as it has been idle (a writer who has left drifts out);
- a document seen once has no pace and is expected last, the newest of them first.

Typed in turn past capacity, the documents that were held keep being held and the newcomer
leaves (about capacity / documents of keystrokes reuse their document); a few busy writers
among many idle documents keep their prefixes, as under least recently used. `wwt bench --only
writers` measures both traces under both policies (docs/performance.md).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

EDIT_SLACK = 8  # a prompt is the same document as held tokens that differ from it only in their last few


def same_document(held: list[int], prompt: list[int], common: int) -> bool:
    """Whether `prompt` continues (or edits near the end) the document `held`, `common` tokens in common."""
    lost = len(held) - common
    return common > lost and lost <= EDIT_SLACK


@dataclass
class Ghost:
    tokens: list[int]
    last_used: int
    gap: Optional[int]


class NextUse:
    """Evict the document whose next keystroke is expected last (the module's docstring)."""

    name = "next-use"

    def __init__(self, ghosts: int = 1024):
        self.ghosts: deque[Ghost] = deque(maxlen=ghosts)

    def expected(self, now: int, last_used: int, gap: Optional[int]) -> float:
        if gap is None:
            return math.inf
        due = last_used + gap
        return due if due >= now else now + (now - last_used)

    def victim(self, candidates: list[int], now: int, last_used: Callable[[int], int],
               gap: Callable[[int], Optional[int]]) -> int:
        return max(candidates, key=lambda h: (self.expected(now, last_used(h), gap(h)), last_used(h)))

    def forget(self, tokens: list[int], last_used: int, gap: Optional[int]) -> None:
        """An evicted document: its pace is kept as a ghost."""
        self.ghosts.append(Ghost(tokens, last_used, gap))

    def recall(self, prompt: list[int], common_prefix) -> Optional[Ghost]:
        """The ghost of the document `prompt` continues, taken out of the list; None if none."""
        for i in range(len(self.ghosts) - 1, -1, -1):
            ghost = self.ghosts[i]
            if same_document(ghost.tokens, prompt, common_prefix(ghost.tokens, prompt)):
                del self.ghosts[i]
                return ghost
        return None


class LeastRecentlyUsed(NextUse):
    """The classic policy, kept to measure against (WWT_KV_EVICTION=lru)."""

    name = "lru"

    def victim(self, candidates, now, last_used, gap) -> int:
        return min(candidates, key=last_used)


POLICIES = {"next-use": NextUse, "lru": LeastRecentlyUsed}
