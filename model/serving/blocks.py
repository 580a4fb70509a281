"""Which blocks of the KV pool hold each sequence's positions, and who shares them.

The KV cache (kv_cache.py) is one pool of fixed-size blocks allocated once. A sequence (a
document's prompt, or one suggestion being written) is a *handle* with a block table: position
p of handle h lives at token `table[p // block_size] * block_size + p % block_size` of the pool.
A document holds the blocks its length needs, not a slot of the whole context.

Blocks are shared by reference: the n suggestions of a request point at their prompt's full
blocks, and a document that begins like another points at their common full blocks. A shared
block is never written: writing into one copies it first (copy on write), so only the block a
sequence is still filling is ever copied, never a whole prompt.

Placement keeps a document's blocks consecutive where the pool allows, because a run of
consecutive blocks is read as one view of the pool with no copy: on a CPU, with no
paged-attention kernel, that is what keeps a long document's step as cheap as a contiguous
slot's (a scattered one is gathered for every step: 1.4-1.6x the step at 900 tokens, measured in
docs/performance.md). So a growing sequence takes the block after its last one when it is free;
a document placed anew takes the first free run with GROWTH_GAP blocks to spare after it, so
the next documents leave it room to grow; and the suggestions' own blocks (short-lived, a
block or two each, read by index anyway) come from the top of the pool, away from documents.

Bookkeeping only, no tensors: this module says which copies to make, kv_cache.py makes them.
"""

from __future__ import annotations

import bisect
from typing import Callable, Optional

Copy = tuple[int, int]  # (source block, destination block): the destination gets the source's keys/values
GROWTH_GAP = 2  # free blocks left after a document placed anew, for it to grow into


class CacheFull(RuntimeError):
    """No block is free and no idle sequence is left to evict (admission should have prevented it)."""


class BlockTables:
    def __init__(self, blocks: int, block_size: int, handles: int):
        if blocks < 1 or block_size < 1:
            raise ValueError("a KV pool needs at least one block of at least one token")
        self.blocks = blocks
        self.block_size = block_size
        self.refs = [0] * blocks
        self._free = list(range(blocks))  # sorted, so the first free run is found in one pass
        self.tables: list[list[int]] = [[] for _ in range(handles)]
        self.aside = 0  # blocks taken out for good (set_aside)
        self.top = [False] * handles  # a suggestion's sequence: its blocks come from the top of the pool
        # Called when no block is free: evicts one idle sequence (slots.py chooses which) and says
        # whether it did. The slot pool sets it.
        self.reclaim: Optional[Callable[[], bool]] = None

    # -- reading -------------------------------------------------------------------------
    @property
    def handles(self) -> int:
        return len(self.tables)

    @property
    def usable(self) -> int:
        """Blocks sequences can hold."""
        return self.blocks - self.aside

    def free_blocks(self) -> int:
        return len(self._free)

    def used_blocks(self) -> int:
        """Blocks held by sequences."""
        return self.usable - len(self._free)

    def blocks_for(self, length: int) -> int:
        return -(-length // self.block_size)

    def runs(self, handle: int, length: int, start: int = 0) -> list[tuple[int, int]]:
        """Positions [start, length) of `handle` as (first pool token, count) runs of consecutive
        pool tokens: one run when its blocks are consecutive."""
        bs, table, out = self.block_size, self.tables[handle], []
        p = start
        while p < length:
            block, offset = divmod(p, bs)
            count = min(bs - offset, length - p)
            first = table[block] * bs + offset
            if out and out[-1][0] + out[-1][1] == first:
                out[-1] = (out[-1][0], out[-1][1] + count)
            else:
                out.append((first, count))
            p += count
        return out

    def token_index(self, handle: int, positions: list[int]) -> list[int]:
        """The pool token of each position of `handle` (the table must cover them)."""
        bs, table = self.block_size, self.tables[handle]
        return [table[p // bs] * bs + p % bs for p in positions]

    def busy_blocks(self, handles) -> set[int]:
        """Blocks referenced by any of `handles`."""
        return {b for h in handles for b in self.tables[h]}

    # -- writing -------------------------------------------------------------------------
    def writable(self, handle: int, start: int, end: int) -> list[Copy]:
        """Make positions [start, end) of `handle` writable: shared blocks among them are copied
        (the copies to make are returned) and missing blocks are allocated."""
        bs, table = self.block_size, self.tables[handle]
        copies = []
        for i in range(start // bs, min(self.blocks_for(end), len(table))):
            if self.refs[table[i]] > 1:
                new = self._take(handle, i, 1)[0]
                copies.append((table[i], new))
                self._unref(table[i])
                table[i] = new
        missing = self.blocks_for(end) - len(table)
        if missing > 0:
            table.extend(self._take(handle, len(table), missing))
        return copies

    def share(self, src: int, dst: int, length: int, suggestion: bool = False) -> list[Copy]:
        """Make `dst` hold positions [0, length) of `src`: their full blocks by reference, the
        partial last one copied (`dst` will write after it). Returns the copies to make.
        `suggestion`: `dst` is a suggestion forked from its prompt (its blocks come from the top)."""
        full, partial = divmod(length, self.block_size)
        shared = self.tables[src][:full]
        for b in shared:
            self.refs[b] += 1
        self.drop(dst)
        self.tables[dst] = list(shared)
        self.top[dst] = suggestion
        if not partial:
            return []
        source = self.tables[src][full]
        self.refs[source] += 1  # held while a block is found: finding one may evict `src` itself
        new = self._take(dst, full, 1)[0]
        self.tables[dst].append(new)
        self._unref(source)  # if that freed it, nothing is written into it before the copy is made
        return [(source, new)]

    def truncate(self, handle: int, length: int) -> None:
        """Keep only the blocks positions [0, length) need."""
        table = self.tables[handle]
        keep = self.blocks_for(length)
        for b in table[keep:]:
            self._unref(b)
        del table[keep:]

    def drop(self, handle: int) -> None:
        self.truncate(handle, 0)
        self.top[handle] = False

    def set_aside(self) -> int:
        """One block taken out of the pool for good (the fixed-shape step parks idle rows in it)."""
        block = self._take(0, 0, 1)[0]  # before any sequence exists: the lowest free block
        self.aside += 1
        return block

    # -- the free list ---------------------------------------------------------------------
    def _unref(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            bisect.insort(self._free, block)

    def _take(self, handle: int, index: int, count: int) -> list[int]:
        """`count` free blocks for positions of block `index` on of `handle`, evicting idle sequences
        while too few are free: right after the block before them if those are free; else, for a
        suggestion, the highest free blocks; else the first free run with room to grow after it, the
        first free run long enough, the lowest free blocks."""
        while len(self._free) < count:
            if self.reclaim is None or not self.reclaim():
                raise CacheFull(f"the KV cache is full: {count} blocks needed, {len(self._free)} free")
        table = self.tables[handle]
        after = table[index - 1] + 1 if 0 < index <= len(table) else None
        chosen = self._run_at(after, count) if after is not None else None
        if chosen is None and self.top[handle]:
            chosen = self._free[-count:]
        if chosen is None:
            chosen = (self._first_run(count + GROWTH_GAP) or self._first_run(count) or self._free[:count])[:count]
        taken = set(chosen)
        self._free = [b for b in self._free if b not in taken]
        for b in chosen:
            self.refs[b] = 1
        return chosen

    def _run_at(self, first: int, count: int) -> Optional[list[int]]:
        i = bisect.bisect_left(self._free, first)
        if i + count <= len(self._free) and self._free[i] == first and self._free[i + count - 1] == first + count - 1:
            return list(range(first, first + count))
        return None

    def _first_run(self, count: int) -> Optional[list[int]]:
        free, run = self._free, 1
        for i in range(len(free)):
            run = run + 1 if i and free[i] == free[i - 1] + 1 else 1
            if run >= count:
                return free[i - count + 1:i + 1]
        return None
