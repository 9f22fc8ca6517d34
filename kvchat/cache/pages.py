"""Paged pools: per (slot, head) sequences of tokens in fixed-size blocks, the bookkeeping under every format.

A block holds `block_size` tokens of one head in every named pool (K rows, V rows, positions, packed
codes, scales... each pool its own trailing shape and dtype). A block table and a length per (slot,
head) say where a head's tokens are, in storage order. Lengths live twice: `lengths` on the device (the
kernels read it) and `host[slot][head]` as Python ints, so deciding what to evict or where to append
never waits on the device.

Byte accounting is physical: `bytes_held` counts the blocks in use plus the index tensors (block
tables, lengths); `bytes_reserved` is the pools' storage, which grows on demand and is trimmed back
when eviction leaves most of it free.
"""

from __future__ import annotations

import math

import torch

from kvchat_kernels import store_gather, store_write

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]  # pool name -> (trailing shape, dtype)


class PagedPools:
    """Indices: slot s, head h, token i (in storage order)."""

    def __init__(self, n_slots: int, n_heads: int, block_size: int, specs: Spec, device, init_blocks: int = 0):
        self.n_slots, self.n_heads, self.bs, self.device = n_slots, n_heads, block_size, device
        self.pools = {name: torch.zeros(init_blocks, block_size, *shape, dtype=dt, device=device)
                      for name, (shape, dt) in specs.items()}
        self.table = torch.zeros(n_slots, n_heads, 1, dtype=torch.int32, device=device)
        self.lengths = torch.zeros(n_slots, n_heads, dtype=torch.int32, device=device)
        self.host = [[0] * n_heads for _ in range(n_slots)]
        self.free: list[int] = list(range(init_blocks - 1, -1, -1))
        self.slot_blocks = [0] * n_slots  # blocks in use per slot

    # ---- sizes -------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return next(iter(self.pools.values())).shape[0]

    @property
    def block_bytes(self) -> int:
        """Bytes one block takes across every pool."""
        return sum(math.prod(p.shape[1:]) * p.element_size() for p in self.pools.values())

    def meta_bytes(self) -> int:
        return self.table.nbytes + self.lengths.nbytes

    def bytes_held(self) -> int:
        return sum(self.slot_blocks) * self.block_bytes + self.meta_bytes()

    def bytes_held_slot(self, slot: int) -> int:
        """The slot's blocks, the table entries naming them and its lengths. Not a share of the whole
        table: its width follows the longest sequence any slot has held, so a request's figure would
        depend on what ran before it (the table's slack counts in `bytes_held`, the run's total)."""
        return (self.slot_blocks[slot] * (self.block_bytes + self.table.element_size())
                + self.lengths.nbytes // self.n_slots)

    def bytes_reserved(self) -> int:
        return sum(t.nbytes for t in self.pools.values()) + self.meta_bytes()

    def used_block_ids(self) -> set[int]:
        """Block ids the tables reference (tests check the accounting against them)."""
        ids = set()
        for s in range(self.n_slots):
            for h in range(self.n_heads):
                n = -(-self.host[s][h] // self.bs)
                ids.update(self.table[s, h, :n].tolist())
        return ids

    # ---- blocks ------------------------------------------------------------------------------------
    def _grow(self, missing: int) -> None:
        old = self.capacity
        new = old + max(missing, old // 8, 4)
        for name, t in self.pools.items():
            grown = torch.zeros(new, *t.shape[1:], dtype=t.dtype, device=t.device)
            grown[:old] = t
            self.pools[name] = grown
        self.free = list(range(new - 1, old - 1, -1)) + self.free

    def _widen(self, n_blocks: int) -> None:
        if n_blocks > self.table.shape[2]:
            extra = max(n_blocks - self.table.shape[2], self.table.shape[2] // 2)
            pad = torch.zeros(self.n_slots, self.n_heads, extra, dtype=torch.int32, device=self.device)
            self.table = torch.cat([self.table, pad], dim=2)

    def _alloc(self, n: int) -> list[int]:
        if len(self.free) < n:
            self._grow(n - len(self.free))
        return [self.free.pop() for _ in range(n)]

    def reserve(self, slot: int, new_lengths: list[int]) -> None:
        """Make sure each head of `slot` has blocks for `new_lengths[h]` tokens."""
        have = [-(-n // self.bs) for n in self.host[slot]]
        want = [-(-n // self.bs) for n in new_lengths]
        self._widen(max(want))
        missing = sum(max(0, w - h) for w, h in zip(want, have))
        if missing == 0:
            return
        ids = iter(self._alloc(missing))
        for h, (w, hv) in enumerate(zip(want, have)):
            if w > hv:
                self.table[slot, h, hv:w] = torch.tensor([next(ids) for _ in range(w - hv)], dtype=torch.int32)
        self.slot_blocks[slot] += missing

    def _set_length(self, slot: int, head: int, n: int) -> None:
        self.host[slot][head] = n
        self.lengths[slot, head] = n

    # ---- writes ------------------------------------------------------------------------------------
    def append_chunk(self, slot: int, values: dict[str, torch.Tensor]) -> None:
        """Append T tokens to every head of `slot`. values[name]: (T, n_heads, *trailing)."""
        T = next(iter(values.values())).shape[0]
        lens = self.host[slot]
        self.reserve(slot, [n + T for n in lens])
        idx = torch.tensor(lens, device=self.device).view(-1, 1) + torch.arange(T, device=self.device).view(1, -1)
        heads = torch.arange(self.n_heads, device=self.device).view(-1, 1)
        blocks = self.table[slot][heads, idx // self.bs].long().flatten()  # (H * T,) head-major
        offs = (idx % self.bs).flatten()
        vals = [values[n].transpose(0, 1).reshape(self.n_heads * T, *values[n].shape[2:]) for n in self.pools]
        store_write(list(self.pools.values()), blocks, offs, vals)
        for h in range(self.n_heads):
            lens[h] += T
        self.lengths[slot] += T

    def append_step(self, slots: list[int], slots_t: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """Append one token to every head of each slot. values[name]: (B, n_heads, *trailing)."""
        for s in slots:
            if any(n % self.bs == 0 for n in self.host[s]):
                self.reserve(s, [n + 1 for n in self.host[s]])
        lens = torch.tensor([self.host[s] for s in slots], device=self.device)  # (B, H)
        heads = torch.arange(self.n_heads, device=self.device).view(1, -1)
        blocks = self.table[slots_t.view(-1, 1), heads, lens // self.bs].long().flatten()
        offs = (lens % self.bs).flatten()
        vals = [values[n].reshape(-1, *values[n].shape[2:]) for n in self.pools]
        store_write(list(self.pools.values()), blocks, offs, vals)
        for s in slots:
            row = self.host[s]
            for h in range(self.n_heads):
                row[h] += 1
        self.lengths[slots_t] += 1

    def locate(self, slot: int, head: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Storage order indices of one (slot, head) -> (block ids, offsets)."""
        idx = idx.long()
        return self.table[slot, head, idx // self.bs].long(), idx % self.bs

    def read(self, slot: int, head: int, idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Every pool's rows of `idx` (default: all stored tokens) of one (slot, head)."""
        if idx is None:
            idx = torch.arange(self.host[slot][head], device=self.device)
        return dict(zip(self.pools, store_gather(list(self.pools.values()), *self.locate(slot, head, idx))))

    def write(self, slot: int, head: int, idx: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """Overwrite stored tokens in place. values[name]: (len(idx), *trailing) for every pool."""
        store_write(list(self.pools.values()), *self.locate(slot, head, idx), [values[n] for n in self.pools])

    def compact(self, slot: int, keep: list[torch.Tensor]) -> None:
        """Keep only `keep[h]` (sorted storage indices) of each head of `slot`; free emptied blocks."""
        for h, idx in enumerate(keep):
            n_old, n = self.host[slot][h], int(idx.numel())
            if n == n_old:
                continue
            kept = self.read(slot, h, idx)
            self.write(slot, h, torch.arange(n, device=self.device), kept)
            self._release(slot, h, n, n_old)

    def _release(self, slot: int, head: int, n: int, n_old: int) -> None:
        have, want = -(-n_old // self.bs), -(-n // self.bs)
        if want < have:
            self.free.extend(self.table[slot, head, want:have].tolist())
            self.table[slot, head, want:have] = 0
            self.slot_blocks[slot] -= have - want
        self._set_length(slot, head, n)

    def free_slot(self, slot: int) -> None:
        for h in range(self.n_heads):
            self._release(slot, h, 0, self.host[slot][h])

    def trim(self) -> None:
        """Give back pool storage: move blocks in use to the lowest ids and shrink the pools to them."""
        n_used = sum(self.slot_blocks)
        if self.capacity - n_used < max(8, self.capacity // 2):
            return
        n_blk = -(-self.lengths // self.bs)  # (n_slots, n_heads)
        live = torch.arange(self.table.shape[2], device=self.device).view(1, 1, -1) < n_blk.unsqueeze(-1)
        old_ids = self.table[live].long()
        new_cap = n_used + max(4, n_used // 8)
        for name, t in self.pools.items():
            small = torch.zeros(new_cap, *t.shape[1:], dtype=t.dtype, device=t.device)
            small[:n_used] = t[old_ids]
            self.pools[name] = small
        self.table.zero_()
        self.table[live] = torch.arange(n_used, dtype=torch.int32, device=self.device)
        self.free = list(range(new_cap - 1, n_used - 1, -1))
