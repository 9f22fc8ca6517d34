"""The paged KV store: per layer a pool of fixed-size blocks, a block table and a length per (slot, kv head).

One block holds `block_size` tokens of one KV head: K and V rows, each token's original position and,
when a method asks for it, an additive logit bias (RazorAttention's compensation token). Heads of one
slot may hold different numbers of tokens and layers are independent, so the same structure holds full
caches, per-layer budgets, per-head windows and evicted/merged caches.

Byte accounting is physical. `bytes_held` counts the blocks in use (K, V, positions, bias) plus the
index tensors (block tables, lengths); `bytes_reserved` is the storage of the pools themselves, which
grow on demand and are trimmed back when eviction leaves most of a pool free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvchat_kernels import store_gather, store_write


@dataclass
class Usage:
    held: int
    full: int


class LayerStore:
    """The blocks of one layer. Indices: slot s, kv head h, token i (in storage order)."""

    def __init__(self, n_slots, n_kv, head_dim, block_size, dtype, device, with_bias=False, init_blocks=0):
        self.n_slots, self.n_kv, self.head_dim, self.bs = n_slots, n_kv, head_dim, block_size
        self.dtype, self.device = dtype, device
        self.with_bias = with_bias
        self.k = torch.zeros(init_blocks, block_size, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.zeros(init_blocks, block_size, dtype=torch.int32, device=device)
        self.bias = torch.zeros(init_blocks, block_size, dtype=torch.float32, device=device) if with_bias else None
        self.table = torch.zeros(n_slots, n_kv, 1, dtype=torch.int32, device=device)
        self.lengths = torch.zeros(n_slots, n_kv, dtype=torch.int32, device=device)
        self.free: list[int] = list(range(init_blocks - 1, -1, -1))
        self.slot_blocks = [0] * n_slots  # blocks in use per slot

    # ---- sizes -------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.k.shape[0]

    @property
    def block_bytes(self) -> int:
        b = 2 * self.bs * self.head_dim * self.k.element_size() + self.bs * self.pos.element_size()
        return b + (self.bs * 4 if self.with_bias else 0)

    def pools(self) -> list[torch.Tensor]:
        return [t for t in (self.k, self.v, self.pos, self.bias) if t is not None]

    def meta_bytes(self) -> int:
        return self.table.nbytes + self.lengths.nbytes

    def bytes_held(self) -> int:
        return sum(self.slot_blocks) * self.block_bytes + self.meta_bytes()

    def bytes_held_slot(self, slot: int) -> int:
        return self.slot_blocks[slot] * self.block_bytes + self.meta_bytes() // self.n_slots

    def bytes_reserved(self) -> int:
        return sum(t.nbytes for t in self.pools()) + self.meta_bytes()

    # ---- blocks ------------------------------------------------------------------------------------
    def _grow(self, missing: int) -> None:
        old = self.capacity
        new = old + max(missing, old // 8, 4)
        for name in ("k", "v", "pos", "bias"):
            t = getattr(self, name)
            if t is None:
                continue
            grown = torch.zeros(new, *t.shape[1:], dtype=t.dtype, device=t.device)
            grown[:old] = t
            setattr(self, name, grown)
        self.free = list(range(new - 1, old - 1, -1)) + self.free

    def _widen(self, n_blocks: int) -> None:
        if n_blocks > self.table.shape[2]:
            extra = max(n_blocks - self.table.shape[2], self.table.shape[2] // 2)
            pad = torch.zeros(self.n_slots, self.n_kv, extra, dtype=torch.int32, device=self.device)
            self.table = torch.cat([self.table, pad], dim=2)

    def _alloc(self, n: int) -> list[int]:
        if len(self.free) < n:
            self._grow(n - len(self.free))
        return [self.free.pop() for _ in range(n)]

    def reserve(self, slot: int, new_lengths: list[int]) -> None:
        """Make sure each head of `slot` has blocks for `new_lengths[h]` tokens."""
        lens = self.lengths[slot].tolist()
        have = [-(-n // self.bs) for n in lens]
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

    # ---- writes ------------------------------------------------------------------------------------
    def append_chunk(self, slot: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Append T tokens to every head of `slot`. k, v (T, H_kv, D); pos (T,)."""
        T = k.shape[0]
        lens = self.lengths[slot]
        self.reserve(slot, (lens + T).tolist())
        idx = lens.view(-1, 1).long() + torch.arange(T, device=self.device).view(1, -1)  # (H_kv, T)
        heads = torch.arange(self.n_kv, device=self.device).view(-1, 1)
        blocks = self.table[slot][heads, idx // self.bs].long().flatten()
        offs = (idx % self.bs).flatten()
        vals = [k.transpose(0, 1).reshape(-1, self.head_dim), v.transpose(0, 1).reshape(-1, self.head_dim),
                pos.to(torch.int32).repeat(self.n_kv)]
        if self.with_bias:
            vals.append(torch.zeros(self.n_kv * T, device=self.device))
        store_write(self.pools(), blocks, offs, vals)
        self.lengths[slot] += T

    def append_step(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Append one token to every head of each slot. slots (B,) long; k, v (B, H_kv, D); pos (B,)."""
        lens = self.lengths[slots]  # (B, H_kv)
        starts = lens % self.bs == 0
        if bool(starts.any()):
            for b, s in enumerate(slots.tolist()):
                if bool(starts[b].any()):
                    self.reserve(s, (lens[b] + 1).tolist())
        heads = torch.arange(self.n_kv, device=self.device).view(1, -1)
        blocks = self.table[slots.view(-1, 1), heads, (lens // self.bs).long()].long().flatten()
        offs = (lens % self.bs).long().flatten()
        vals = [k.reshape(-1, self.head_dim), v.reshape(-1, self.head_dim),
                pos.to(torch.int32).view(-1, 1).expand(-1, self.n_kv).flatten()]
        if self.with_bias:
            vals.append(torch.zeros(blocks.numel(), device=self.device))
        store_write(self.pools(), blocks, offs, vals)
        self.lengths[slots] += 1

    def locate(self, slot: int, head: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Storage order indices of one (slot, head) -> (block ids, offsets)."""
        idx = idx.long()
        return self.table[slot, head, idx // self.bs].long(), idx % self.bs

    def read(self, slot: int, head: int, idx: torch.Tensor | None = None) -> list[torch.Tensor]:
        """K, V, positions (and bias) of `idx` (default: all stored tokens) of one (slot, head)."""
        if idx is None:
            idx = torch.arange(int(self.lengths[slot, head]), device=self.device)
        return store_gather(self.pools(), *self.locate(slot, head, idx))

    def write(self, slot: int, head: int, idx: torch.Tensor, values: list[torch.Tensor]) -> None:
        """Overwrite stored tokens in place (merges, compensation tokens). values as `read` returns."""
        store_write(self.pools(), *self.locate(slot, head, idx), values)

    def compact(self, slot: int, keep: list[torch.Tensor]) -> None:
        """Keep only `keep[h]` (sorted storage indices) of each head of `slot`; free emptied blocks."""
        for h, idx in enumerate(keep):
            n_old = int(self.lengths[slot, h])
            n = int(idx.numel())
            if n == n_old:
                continue
            kept = self.read(slot, h, idx)
            self.write(slot, h, torch.arange(n, device=self.device), kept)
            self._release(slot, h, n, n_old)

    def truncate(self, slot: int, head: int, n: int) -> None:
        self._release(slot, head, n, int(self.lengths[slot, head]))

    def _release(self, slot: int, head: int, n: int, n_old: int) -> None:
        have, want = -(-n_old // self.bs), -(-n // self.bs)
        if want < have:
            self.free.extend(self.table[slot, head, want:have].tolist())
            self.table[slot, head, want:have] = 0
            self.slot_blocks[slot] -= have - want
        self.lengths[slot, head] = n

    def free_slot(self, slot: int) -> None:
        for h in range(self.n_kv):
            self._release(slot, h, 0, int(self.lengths[slot, h]))

    def trim(self) -> None:
        """Give back pool storage: move blocks in use to the lowest ids and shrink the pools to them."""
        n_used = sum(self.slot_blocks)
        if self.capacity - n_used < max(8, self.capacity // 2):
            return
        n_blk = -(-self.lengths // self.bs)  # (n_slots, n_kv)
        live = torch.arange(self.table.shape[2], device=self.device).view(1, 1, -1) < n_blk.unsqueeze(-1)
        old_ids = self.table[live].long()
        new_cap = n_used + max(4, n_used // 8)
        for name in ("k", "v", "pos", "bias"):
            t = getattr(self, name)
            if t is not None:
                small = torch.zeros(new_cap, *t.shape[1:], dtype=t.dtype, device=t.device)
                small[:n_used] = t[old_ids]
                setattr(self, name, small)
        self.table.zero_()
        self.table[live] = torch.arange(n_used, dtype=torch.int32, device=self.device)
        self.free = list(range(new_cap - 1, n_used - 1, -1))
