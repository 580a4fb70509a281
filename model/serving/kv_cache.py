"""The static KV cache and the views a forward pass reads and writes it through.

`KVCache` holds key/value buffers for one pool of blocks, allocated once; blocks.py says which
blocks hold each sequence. A view says which sequences and positions one forward pass uses;
the network calls `view.attend(...)` in every layer (model/network/gpt.py takes the view as its
`cache` argument) and never sees the buffers themselves.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..network.config import GPTConfig
from .blocks import BlockTables


BLOCK_SIZE = 16  # tokens per block: docs/performance.md ("Many writers: the KV pool") has the measurement


class KVCache(nn.Module):
    """Key/value buffers of one pool of blocks, allocated once: [layer, head, block x position, dim].

    A sequence is a handle whose block table (blocks.py) says where its positions live. A forward
    pass writes the keys/values of the positions it computes in place and reads back positions
    [0, length) of its sequences. Nothing is ever concatenated or reallocated.

    `tokens` sizes the pool (default: `slots` sequences of the whole `context`); `handles` is how
    many sequences may exist at once (default `slots`), held documents and running rows together.
    """

    def __init__(self, config: GPTConfig, slots: int = 1, context: Optional[int] = None,
                 dtype=torch.float32, device="cpu", *, tokens: Optional[int] = None,
                 handles: Optional[int] = None, block_size: int = BLOCK_SIZE):
        super().__init__()
        self.context = context or config.n_positions
        self.block_size = block_size
        per_sequence = -(-self.context // block_size)
        blocks = -(-tokens // block_size) if tokens else slots * per_sequence
        self.blocks = BlockTables(blocks, block_size, handles or slots)
        shape = (config.n_layer, config.n_head, blocks * block_size, config.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def tokens(self) -> int:
        """Positions the pool holds, all sequences together."""
        return self.blocks.blocks * self.block_size

    def view(self, handles: Sequence[int], positions: torch.Tensor,
             shared: Sequence[tuple[Sequence[int], int]] = ()) -> "CacheView":
        """Row b of a pass writes at `positions[b]` ([B, T]) of sequence `handles[b]`; see CacheView."""
        return CacheView(self, handles, positions, shared)

    def fixed_rows(self, tables: torch.Tensor, positions: torch.Tensor) -> "FixedRowsView":
        """One token in each of a fixed number of rows (block tables [R, W], positions [R, 1])."""
        return FixedRowsView(self, tables, positions)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def bytes_per_token(self) -> int:
        return self.nbytes() // self.tokens

    @torch.no_grad()
    def copy_blocks(self, copies: Sequence[tuple[int, int]]) -> None:
        """Copy whole blocks (source, destination) in every layer: a copy on write."""
        bs = self.block_size
        for src, dst in copies:
            self.k[:, :, dst * bs:(dst + 1) * bs].copy_(self.k[:, :, src * bs:(src + 1) * bs])
            self.v[:, :, dst * bs:(dst + 1) * bs].copy_(self.v[:, :, src * bs:(src + 1) * bs])

    def fork(self, src: int, dst: int, length: int, suggestion: bool = False) -> None:
        """Make sequence `dst` hold positions [0, length) of `src`: their full blocks shared, the
        partial last one copied. `suggestion`: `dst` is a suggestion of the prompt `src` holds."""
        if src != dst and length > 0:
            self.copy_blocks(self.blocks.share(src, dst, length, suggestion))

    def writable(self, handle: int, start: int, end: int) -> None:
        """Blocks for positions [start, end) of `handle`, its own (copied first where shared)."""
        self.copy_blocks(self.blocks.writable(handle, start, end))

    def reader(self, handle: int, length: int, start: int = 0):
        """How to read positions [start, length) of a sequence from a layer's buffer: a slice when
        its blocks are consecutive (a view, no copy), else an index tensor (a gathered copy). Worked
        out once per pass and used in every layer."""
        runs = self.blocks.runs(handle, length, start)
        if len(runs) == 1:
            first, count = runs[0]
            return slice(first, first + count)
        return torch.tensor(self.blocks.token_index(handle, range(start, length)), device=self.k.device)

    def read(self, buffer: torch.Tensor, handle: int, length: int, start: int = 0) -> torch.Tensor:
        """Positions [start, length) of a sequence from one layer's buffer [H, N, D]: [H, L, D]."""
        return read(buffer, self.reader(handle, length, start))


def read(buffer: torch.Tensor, reader) -> torch.Tensor:
    """A layer's buffer [H, N, D] read through a KVCache.reader: [H, L, D]."""
    return buffer[:, reader] if isinstance(reader, slice) else buffer.index_select(1, reader)


GATHER_MIN_ROWS = 4
GATHER_MAX_POSITIONS = 8192  # rows x longest row: the size of the copy a gathered read makes
SHARED_PREFIX_MIN = 64  # shorter shared prompts are cheaper to read once per row


class CacheView:
    """Where one forward pass reads and writes in a KVCache: sequences [B], positions [B, T].

    Each row attends to its own sequence's positions [0, its last position], read as a view of
    the pool when its blocks are consecutive (no copy), else gathered.

    `shared` lists groups of decode rows whose sequences hold the same first `prefix` positions
    (the n suggestions forked from one prompt): such a group reads that prefix once for all
    its rows instead of once per row, so n suggestions on a long document cost about what
    one does.
    """

    def __init__(self, cache: KVCache, handles: Sequence[int], positions: torch.Tensor,
                 shared: Sequence[tuple[Sequence[int], int]] = ()):
        self.cache = cache
        self.positions = positions
        self.slots = list(handles)
        self.lengths = [p + 1 for p in positions.max(dim=1).values.tolist()]
        if max(self.lengths) > cache.context:
            raise ValueError(f"position {max(self.lengths) - 1} is past the context of {cache.context}")
        starts = positions.min(dim=1).values.tolist()
        for h, start, end in zip(self.slots, starts, self.lengths):
            cache.writable(h, start, end)
        device = positions.device
        self.write_index = torch.tensor([cache.blocks.token_index(h, row) for h, row in
                                         zip(self.slots, positions.tolist())], device=device)  # [B, T]
        T = positions.shape[1]
        self.shared = []
        if T == 1:
            for rows, prefix in shared:
                rows = list(rows)
                if len(rows) > 1 and prefix >= SHARED_PREFIX_MIN:
                    if any(self.lengths[b] <= prefix for b in rows):
                        raise ValueError("a row of a shared group must decode past its shared prefix")
                    self.shared.append((rows, prefix))
        grouped = {b for rows, _ in self.shared for b in rows}
        self.solo = [b for b in range(len(self.slots)) if b not in grouped]
        # Each row reads a view of its own blocks (no copy) unless the rows are many and short:
        # then one attention call over a gathered copy costs less than a call per row.
        self.gather_mask = self.gather_index = None
        longest = max(self.lengths)
        if T == 1 and not self.shared and len(self.slots) >= GATHER_MIN_ROWS and \
                len(self.slots) * longest <= GATHER_MAX_POSITIONS:
            keys = torch.arange(longest, device=device)
            self.gather_mask = keys[None, None, None, :] <= positions[:, None, :, None]
            self.gather_index = torch.tensor([cache.blocks.token_index(h, range(length)) + [0] * (longest - length)
                                              for h, length in zip(self.slots, self.lengths)], device=device)
        # how each solo row reads its positions, and each shared group its prefix, in every layer
        self.readers = {b: cache.reader(self.slots[b], self.lengths[b]) for b in self.solo} \
            if self.gather_mask is None else {}
        self.prefix_readers = [cache.reader(self.slots[rows[0]], prefix) for rows, prefix in self.shared]
        self.own = [self._own_positions(rows, prefix) for rows, prefix in self.shared]
        self.masks = [None] * len(self.slots)
        if T > 1:  # several new tokens: each sees the sequence's earlier positions and the ones before it
            for b, length in enumerate(self.lengths):
                keys = torch.arange(length, device=device)
                self.masks[b] = keys[None, None, None, :] <= positions[b][None, None, :, None]

    def attend(self, layer: int, q, k, v, scale: float, upcast: bool) -> torch.Tensor:
        """Write this step's k, v ([B, H, T, D]) into the cache; attention output [B, H, T, D].

        A cache kept in a narrower dtype than the compute (bfloat16 keys and values under float32
        activations) is read as it is: the queries are cast to it, and the kernels accumulate in
        float32."""
        ck, cv = self.cache.k[layer], self.cache.v[layer]  # [H, N, D]
        index = self.write_index.reshape(-1)
        ck[:, index] = k.transpose(0, 1).reshape(k.shape[1], -1, k.shape[3]).to(ck.dtype)
        cv[:, index] = v.transpose(0, 1).reshape(v.shape[1], -1, v.shape[3]).to(cv.dtype)
        kv_dtype = torch.float32 if upcast else ck.dtype
        if self.gather_mask is not None:  # many short rows: one call over a gathered copy
            kb = ck[:, self.gather_index].transpose(0, 1).to(kv_dtype)  # [B, H, L, D]
            vb = cv[:, self.gather_index].transpose(0, 1).to(kv_dtype)
            return F.scaled_dot_product_attention(q.to(kv_dtype), kb, vb, attn_mask=self.gather_mask,
                                                  scale=scale).to(q.dtype)
        out = torch.empty_like(q)
        for (rows, _), reader, own in zip(self.shared, self.prefix_readers, self.own):
            out[rows] = self._attend_shared(ck, cv, q[rows], reader, own, scale, kv_dtype).to(q.dtype)
        for b in self.solo:  # a view per row when its blocks are consecutive: no copy
            kb, vb = read(ck, self.readers[b])[None], read(cv, self.readers[b])[None]
            out[b:b + 1] = F.scaled_dot_product_attention(q[b:b + 1].to(kv_dtype), kb.to(kv_dtype), vb.to(kv_dtype),
                                                          attn_mask=self.masks[b], scale=scale)
        return out

    def _own_positions(self, rows: list[int], prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each row of a shared group keeps its positions past the prefix ([n, own] pool
        tokens; a shorter row repeats its last one) and which of them are past its end ([n, own])."""
        own = max(self.lengths[b] for b in rows) - prefix
        index = []
        for b in rows:
            mine = self.cache.blocks.token_index(self.slots[b], range(prefix, self.lengths[b]))
            index.append(mine + mine[-1:] * (own - len(mine)))
        device = self.positions.device
        ends = torch.tensor([self.lengths[b] - prefix for b in rows], device=device)
        return torch.tensor(index, device=device), torch.arange(own, device=device)[None, :] >= ends[:, None]

    def _attend_shared(self, ck, cv, q, reader, own, scale: float, kv_dtype) -> torch.Tensor:
        """One decode token for each row of a group: the shared prefix from the first row's sequence
        (`reader`), read once for all of them, then each row's own later positions (`own`, from
        _own_positions); the two softmaxes are merged through their log-sum-exps (as flash-decoding
        does), in float32. [n, H, 1, D]."""
        index, past_end = own
        qg = q[:, :, 0].transpose(0, 1)  # [H, n, D]
        kp, vp = read(ck, reader)[None], read(cv, reader)[None]  # [1, H, P, D]
        out_p, lse = _prefix_attention(qg[None].to(kv_dtype), kp.to(kv_dtype), vp.to(kv_dtype), scale)
        ks, vs = ck[:, index].float(), cv[:, index].float()  # [H, n, own, D]
        scores = torch.einsum("hnd,hnsd->hns", qg.float(), ks) * scale  # [H, n, own]
        scores.masked_fill_(past_end, float("-inf"))
        lse = lse[0].float()  # [H, n]
        top = torch.maximum(lse, scores.amax(dim=-1))
        weight_p = (lse - top).exp()  # [H, n]
        weights = (scores - top[..., None]).exp()  # [H, n, own]
        out = weight_p[..., None] * out_p[0].float() + torch.einsum("hns,hnsd->hnd", weights, vs)
        out = out / (weight_p + weights.sum(dim=-1))[..., None]
        return out.transpose(0, 1)[:, :, None]


def _prefix_attention(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(q k^T * scale) v, logsumexp of the scores) for q [1, H, n, D] over k, v [1, H, P, D]:
    the CPU's flash kernel where there is one (it reads k and v once, in their own dtype), else
    the same in plain operations."""
    if q.device.type == "cpu" and _CPU_FLASH is not None:
        return _CPU_FLASH(q, k, v, 0.0, False, scale=scale)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    lse = scores.logsumexp(dim=-1)
    return (scores - lse[..., None]).exp() @ v.float(), lse


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class FixedRowsView:
    """One decode token for each of a fixed number of rows, with shapes that never change.

    Row r reads through its block table `tables[r]` ([R, W], W blocks cover the context) under
    a mask of its own positions. No Python number is read from the GPU, so the step can be
    captured as a CUDA graph and replayed with new tables and positions. Rows with nothing to
    decode point every entry of their table at a parking block that holds no real token.
    """

    def __init__(self, cache: KVCache, tables: torch.Tensor, positions: torch.Tensor):
        self.cache = cache
        bs = cache.block_size
        offsets = torch.arange(bs, device=tables.device)
        self.read_index = (tables[:, :, None] * bs + offsets).reshape(tables.shape[0], -1)  # [R, W x bs]
        self.write_index = self.read_index.gather(1, positions)[:, 0]  # [R]
        keys = torch.arange(self.read_index.shape[1], device=positions.device)
        self.mask = keys[None, None, None, :] <= positions[:, None, :, None]  # [R, 1, 1, W x bs]

    def attend(self, layer: int, q, k, v, scale: float, upcast: bool) -> torch.Tensor:
        ck, cv = self.cache.k[layer], self.cache.v[layer]
        ck[:, self.write_index] = k[:, :, 0].transpose(0, 1).to(ck.dtype)
        cv[:, self.write_index] = v[:, :, 0].transpose(0, 1).to(cv.dtype)
        kv_dtype = torch.float32 if upcast else ck.dtype
        kb = ck[:, self.read_index].transpose(0, 1).to(kv_dtype)  # [R, H, W x bs, D]
        vb = cv[:, self.read_index].transpose(0, 1).to(kv_dtype)
        return F.scaled_dot_product_attention(q.to(kv_dtype), kb, vb, attn_mask=self.mask,
                                              scale=scale).to(q.dtype)
