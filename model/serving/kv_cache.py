"""The static KV cache and the views a forward pass reads and writes it through.

`KVCache` holds key/value buffers for `slots` sequences, allocated once. A view says which
slots and positions one forward pass uses; the network calls `view.attend(...)` in every
layer (model/network/gpt.py takes the view as its `cache` argument) and never sees the
buffers themselves.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..network.config import GPTConfig


class KVCache(nn.Module):
    """Key/value buffers for `slots` sequences, allocated once: [layer, slot, head, position, dim].

    A forward pass writes the keys/values of the positions it computes in place and reads
    back positions [0, length) of its slots. Nothing is ever concatenated or reallocated,
    so the shapes a decode step sees are fixed.
    """

    def __init__(self, config: GPTConfig, slots: int, context: Optional[int] = None,
                 dtype=torch.float32, device="cpu"):
        super().__init__()
        self.slots = slots
        self.context = context or config.n_positions
        shape = (config.n_layer, slots, config.n_head, self.context, config.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def view(self, slots: Sequence[int], positions: torch.Tensor,
             shared: Sequence[tuple[Sequence[int], int]] = ()) -> "CacheView":
        """Row b of a pass writes at `positions[b]` ([B, T]) of slot `slots[b]`; see CacheView."""
        return CacheView(self, slots, positions, shared)

    def all_slots(self, positions: torch.Tensor) -> "AllSlotsView":
        """One token in every slot at fixed shapes (positions [slots, 1]); see AllSlotsView."""
        return AllSlotsView(self, positions)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    @torch.no_grad()
    def copy_slot(self, src: int, dst: int, length: int, start: int = 0) -> None:
        """Fork: make positions [start, length) of slot `dst` those of slot `src`.

        `start` skips what `dst` already holds in common with `src`.
        """
        if src != dst and length > start:
            self.k[:, dst, :, start:length].copy_(self.k[:, src, :, start:length])
            self.v[:, dst, :, start:length].copy_(self.v[:, src, :, start:length])


GATHER_MIN_ROWS = 4
GATHER_MAX_POSITIONS = 8192  # rows x longest row: the size of the copy a gathered read makes
SHARED_PREFIX_MIN = 64  # shorter shared prompts are cheaper to read once per row


class CacheView:
    """Where one forward pass reads and writes in a KVCache: slots [B], positions [B, T].

    Each row attends to its own slot's positions [0, its last position] read as a view of
    the buffers, so a decode step copies no cache memory whichever slots it uses.

    `shared` lists groups of decode rows whose slots hold the same first `prefix` positions
    (the n suggestions forked from one prompt): such a group reads that prefix once for all
    its rows instead of once per row, so n suggestions on a long document cost about what
    one does.
    """

    def __init__(self, cache: KVCache, slots: Sequence[int], positions: torch.Tensor,
                 shared: Sequence[tuple[Sequence[int], int]] = ()):
        self.cache = cache
        self.positions = positions
        self.slots = list(slots)
        self.lengths = [p + 1 for p in positions.max(dim=1).values.tolist()]
        if max(self.lengths) > cache.context:
            raise ValueError(f"position {max(self.lengths) - 1} is past the context of {cache.context}")
        self.slot_index = torch.tensor(self.slots, device=positions.device)[:, None]
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
        # Each row reads a view of its own slot (no copy) unless the rows are many and short:
        # then one attention call over a gathered copy costs less than a call per row.
        self.gather_mask = None
        if T == 1 and not self.shared and len(self.slots) >= GATHER_MIN_ROWS and \
                len(self.slots) * max(self.lengths) <= GATHER_MAX_POSITIONS:
            keys = torch.arange(max(self.lengths), device=positions.device)
            self.gather_mask = keys[None, None, None, :] <= positions[:, None, :, None]
        self.masks = [None] * len(self.slots)
        if T > 1:  # several new tokens: each sees the slot's earlier positions and the ones before it
            for b, length in enumerate(self.lengths):
                keys = torch.arange(length, device=positions.device)
                self.masks[b] = keys[None, None, None, :] <= positions[b][None, None, :, None]

    def _rows(self, buffer: torch.Tensor) -> torch.Tensor:
        """Positions [0, longest) of this pass's slots: a view when they are consecutive."""
        first, n, longest = self.slots[0], len(self.slots), max(self.lengths)
        if self.slots == list(range(first, first + n)):
            return buffer[first:first + n, :, :longest]
        return buffer[:, :, :longest].index_select(0, self.slot_index[:, 0])

    def attend(self, layer: int, q, k, v, scale: float, upcast: bool) -> torch.Tensor:
        """Write this step's k, v ([B, H, T, D]) into the cache; attention output [B, H, T, D].

        A cache kept in a narrower dtype than the compute (bfloat16 keys and values under float32
        activations) is read as it is: the queries are cast to it, and the kernels accumulate in
        float32."""
        ck, cv = self.cache.k[layer], self.cache.v[layer]
        ck[self.slot_index, :, self.positions] = k.transpose(1, 2).to(ck.dtype)
        cv[self.slot_index, :, self.positions] = v.transpose(1, 2).to(cv.dtype)
        kv_dtype = torch.float32 if upcast else ck.dtype
        if self.gather_mask is not None:  # many short rows: one call over a gathered copy
            kb, vb = self._rows(ck).to(kv_dtype), self._rows(cv).to(kv_dtype)
            return F.scaled_dot_product_attention(q.to(kv_dtype), kb, vb, attn_mask=self.gather_mask,
                                                  scale=scale).to(q.dtype)
        out = torch.empty_like(q)
        for rows, prefix in self.shared:
            out[rows] = self._attend_shared(ck, cv, q[rows], rows, prefix, scale, kv_dtype).to(q.dtype)
        for b in self.solo:  # a view per row: no copy
            slot, length = self.slots[b], self.lengths[b]
            qb, kb, vb = q[b:b + 1], ck[slot:slot + 1, :, :length], cv[slot:slot + 1, :, :length]
            out[b:b + 1] = F.scaled_dot_product_attention(qb.to(kv_dtype), kb.to(kv_dtype), vb.to(kv_dtype),
                                                          attn_mask=self.masks[b], scale=scale)
        return out

    def _attend_shared(self, ck, cv, q, rows, prefix: int, scale: float, kv_dtype) -> torch.Tensor:
        """One decode token for each of `rows`: the shared prefix from the first row's slot, read
        once for all of them, then each row's own later positions; the two softmaxes are merged
        through their log-sum-exps (as flash-decoding does), in float32. [n, H, 1, D]."""
        first = self.slots[rows[0]]
        own = max(self.lengths[b] for b in rows) - prefix
        qg = q[:, :, 0].transpose(0, 1)  # [H, n, D]
        kp, vp = ck[first:first + 1, :, :prefix], cv[first:first + 1, :, :prefix]  # [1, H, P, D]
        out_p, lse = _prefix_attention(qg[None].to(kv_dtype), kp.to(kv_dtype), vp.to(kv_dtype), scale)
        ks = torch.stack([ck[self.slots[b], :, prefix:prefix + own] for b in rows]).float()  # [n, H, own, D]
        vs = torch.stack([cv[self.slots[b], :, prefix:prefix + own] for b in rows]).float()
        scores = torch.einsum("hnd,nhsd->hns", qg.float(), ks) * scale  # [H, n, own]
        ends = torch.tensor([self.lengths[b] - prefix for b in rows], device=q.device)
        past_end = torch.arange(own, device=q.device)[None, :] >= ends[:, None]  # [n, own]
        scores.masked_fill_(past_end, float("-inf"))
        lse = lse[0].float()  # [H, n]
        top = torch.maximum(lse, scores.amax(dim=-1))
        weight_p = (lse - top).exp()  # [H, n]
        weights = (scores - top[..., None]).exp()  # [H, n, own]
        out = weight_p[..., None] * out_p[0].float() + torch.einsum("hns,nhsd->hnd", weights, vs)
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


class AllSlotsView:
    """One decode token for every slot at once, with shapes that never change.

    Row i is slot i; each row attends over the whole context under a mask of its own
    positions. No Python number is read from the GPU, so the step can be captured as a
    CUDA graph and replayed. Rows with nothing to decode write at the last position, which
    the scheduler never uses for real tokens.
    """

    def __init__(self, cache: KVCache, positions: torch.Tensor):
        self.cache = cache
        self.positions = positions  # [S, 1]
        keys = torch.arange(cache.context, device=positions.device)
        self.mask = keys[None, None, None, :] <= positions[:, None, :, None]  # [S, 1, 1, context]
        self.rows = torch.arange(cache.slots, device=positions.device)[:, None]

    def attend(self, layer: int, q, k, v, scale: float, upcast: bool) -> torch.Tensor:
        ck, cv = self.cache.k[layer], self.cache.v[layer]
        ck[self.rows, :, self.positions] = k.transpose(1, 2).to(ck.dtype)
        cv[self.rows, :, self.positions] = v.transpose(1, 2).to(cv.dtype)
        kv_dtype = torch.float32 if upcast else ck.dtype
        return F.scaled_dot_product_attention(q.to(kv_dtype), ck.to(kv_dtype), cv.to(kv_dtype), attn_mask=self.mask,
                                              scale=scale).to(q.dtype)
