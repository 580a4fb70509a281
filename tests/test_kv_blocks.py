"""The KV pool's block tables: sequences hold the blocks their length needs, share full blocks by
reference, copy a shared block before writing into it, and stay consecutive where the pool allows."""

from __future__ import annotations

import pytest
import torch

from model.network.config import GPTConfig
from model.serving.blocks import BlockTables, CacheFull
from model.serving.kv_cache import KVCache


def test_a_sequence_takes_the_blocks_its_length_needs_and_gives_them_back():
    t = BlockTables(blocks=8, block_size=4, handles=3)
    assert t.writable(0, 0, 9) == []  # 9 positions: 3 blocks
    assert t.tables[0] == [0, 1, 2] and t.free_blocks() == 5
    t.writable(0, 9, 12)  # the third block has room: nothing new
    assert len(t.tables[0]) == 3
    t.truncate(0, 5)
    assert t.tables[0] == [0, 1] and t.free_blocks() == 6
    t.drop(0)
    assert t.tables[0] == [] and t.free_blocks() == 8 and t.refs == [0] * 8


def test_sharing_points_at_full_blocks_and_copies_the_partial_one():
    t = BlockTables(blocks=8, block_size=4, handles=3)
    t.writable(0, 0, 10)  # blocks 0, 1 full, 2 partial
    copies = t.share(0, 1, 10)
    assert t.tables[1][:2] == [0, 1] and t.refs[0] == t.refs[1] == 2
    assert copies == [(2, t.tables[1][2])] and t.tables[1][2] not in t.tables[0]
    assert t.share(0, 2, 8) == [] and t.tables[2] == [0, 1]  # a whole number of blocks: nothing copied
    # writing into a shared block copies it first (copy on write); the others keep theirs
    copies = t.writable(2, 5, 9)
    assert len(copies) == 1 and copies[0][0] == 1 and t.tables[2][0] == 0 and t.tables[2][1] != 1
    assert t.refs[1] == 2 and t.refs[0] == 3


def test_a_growing_sequence_takes_the_block_after_its_last_and_runs_are_read_as_one():
    t = BlockTables(blocks=16, block_size=4, handles=3)
    t.writable(0, 0, 4)
    t.writable(1, 0, 4)  # another sequence takes block 1
    t.writable(0, 4, 8)  # block 1 is taken: the first free run
    assert t.tables[0] == [0, 2]
    t.writable(0, 8, 16)
    assert t.tables[0] == [0, 2, 3, 4]
    assert t.runs(0, 14) == [(0, 4), (8, 10)]  # block 0, then blocks 2-4 as one run
    assert t.token_index(0, [0, 3, 4, 13]) == [0, 3, 8, 17]
    t.writable(2, 0, 12)  # three blocks at once: the first free run of three
    assert t.tables[2] == [5, 6, 7] and t.runs(2, 12) == [(20, 12)]


def test_a_full_pool_evicts_through_reclaim_and_says_so_when_it_cannot():
    t = BlockTables(blocks=4, block_size=4, handles=3)
    t.writable(0, 0, 16)
    evicted = []

    def reclaim():
        if t.tables[0]:
            evicted.append(0)
            t.drop(0)
            return True
        return False

    t.reclaim = reclaim
    t.writable(1, 0, 8)
    assert evicted == [0] and len(t.tables[1]) == 2
    t.writable(2, 0, 8)
    with pytest.raises(CacheFull, match="KV cache is full"):
        t.writable(2, 8, 12)


def test_forked_sequences_write_their_own_copies_of_a_shared_block():
    """Tensors: a suggestion forked from a prompt writes into its copy of the partial block; the
    prompt's own keys are unchanged, and a full block stays one block in memory."""
    config = GPTConfig(vocab_size=50, n_positions=64, n_embd=8, n_layer=2, n_head=2)
    cache = KVCache(config, slots=3, block_size=4)
    cache.writable(0, 0, 6)
    cache.k.normal_()
    cache.v.normal_()
    before = cache.k.clone()
    cache.fork(0, 1, 6)  # block 0 shared, block 1 (positions 4-5) copied
    table0, table1 = cache.blocks.tables[0], cache.blocks.tables[1]
    assert table1[0] == table0[0] and table1[1] != table0[1]
    own = table1[1] * 4
    assert torch.equal(cache.k[:, :, own:own + 2], before[:, :, table0[1] * 4:table0[1] * 4 + 2])
    cache.writable(1, 6, 7)
    cache.k[:, :, own + 2] = 7.0  # the suggestion's next position
    assert torch.equal(cache.k[:, :, :table0[1] * 4 + 4], before[:, :, :table0[1] * 4 + 4])
    view = cache.read(cache.k[0], 1, 7)
    assert view.shape == (2, 7, 4) and torch.equal(view[:, 6], torch.full((2, 4), 7.0))
