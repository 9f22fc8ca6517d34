"""Paged pools: per (slot, head) sequences of tokens in fixed-size blocks, the bookkeeping under every format.

A block holds `block_size` tokens of one head in every named pool (K rows, V rows, positions, packed
codes, scales... each pool its own trailing shape and dtype). A block table and a length per (slot,
head) say where a head's tokens are, in storage order. The bookkeeping lives on the host as Python ints
(`host[slot][head]` lengths, `blocks[slot][head]` block ids), so deciding what to evict or where to
append never waits on the device and a decode step costs no index arithmetic on tensors; the device
copies the kernels read (`table`, `lengths`) follow: the table is written when a block is taken or
given back (once per block_size tokens), the lengths tensor is rebuilt from the host when read after a
change.

Byte accounting is physical: `bytes_held` counts the blocks in use plus the index tensors (block
tables, lengths); `bytes_reserved` is the pools' storage, which grows on demand and is trimmed back
when eviction leaves most of it free.
"""

from __future__ import annotations

import math

import torch

from kvchat_kernels import choose_impl, cpu, cpu_evict, store_gather, store_write
from kvchat_kernels.store_ops import index_rows

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]  # pool name -> (trailing shape, dtype)


class PagedPools:
    """Indices: slot s, head h, token i (in storage order)."""

    def __init__(self, n_slots: int, n_heads: int, block_size: int, specs: Spec, device, init_blocks: int = 0):
        self.n_slots, self.n_heads, self.bs, self.device = n_slots, n_heads, block_size, device
        self.pools = {name: torch.zeros(init_blocks, block_size, *shape, dtype=dt, device=device)
                      for name, (shape, dt) in specs.items()}
        self.table = torch.zeros(n_slots, n_heads, 1, dtype=torch.int32, device=device)
        self._lengths = torch.zeros(n_slots, n_heads, dtype=torch.int32, device=device)
        self._stale = False  # the host lengths changed since _lengths was built
        self._views: dict[str, tuple] = {}  # `_run_view`'s: name -> (tensor, s0, its rows from s0)
        self.host = [[0] * n_heads for _ in range(n_slots)]
        self.blocks = [[[] for _ in range(n_heads)] for _ in range(n_slots)]  # host mirror of `table`
        self.free: list[int] = list(range(init_blocks - 1, -1, -1))
        self.slot_blocks = [0] * n_slots  # blocks in use per slot
        self.block_bytes = sum(math.prod(shape) * torch.empty((), dtype=dt).element_size()
                               for shape, dt in specs.values()) * block_size  # across every pool
        self.impl = choose_impl(torch.device(device))  # once: a decode step does not ask again
        # the CPU's native append (kernels/cpu.py): pools are contiguous CPU tensors, grown by torch.cat
        self.native = self.impl == "native"
        self.on_cpu = torch.device(device).type == "cpu"  # asked every layer of a step: not a tensor attribute

    @property
    def lengths(self) -> torch.Tensor:
        """(n_slots, n_heads) int32 on the device: the host lengths, rebuilt only after they changed."""
        if self._stale:
            self._lengths = torch.tensor(self.host, dtype=torch.int32, device=self.device)
            self._stale = False
        return self._lengths

    # ---- sizes -------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return next(iter(self.pools.values())).shape[0]

    def meta_bytes(self) -> int:
        return self.table.nbytes + self._lengths.nbytes

    def bytes_held(self) -> int:
        return sum(self.slot_blocks) * self.block_bytes + self.meta_bytes()

    def bytes_held_slot(self, slot: int) -> int:
        """The slot's blocks, the table entries naming them and its lengths. Not a share of the whole
        table: its width follows the longest sequence any slot has held, so a request's figure would
        depend on what ran before it (the table's slack counts in `bytes_held`, the run's total)."""
        return (self.slot_blocks[slot] * (self.block_bytes + self.table.element_size())
                + self._lengths.nbytes // self.n_slots)

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

    def check(self, slot: int) -> None:
        """Invariants tests assert after every step: the host bookkeeping and the device copies agree."""
        for h in range(self.n_heads):
            n, ids = self.host[slot][h], self.blocks[slot][h]
            if len(ids) != -(-n // self.bs) or self.table[slot, h, : len(ids)].tolist() != ids:
                raise AssertionError(f"pages: slot {slot} head {h}: host blocks {ids} for {n} tokens, "
                                     f"table {self.table[slot, h].tolist()}")
        if self.lengths[slot].tolist() != self.host[slot]:
            raise AssertionError(f"pages: slot {slot}: lengths {self.lengths[slot].tolist()} != host {self.host[slot]}")

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

    def reserve(self, slot: int, new_lengths: list[int]) -> None:
        """Make sure each head of `slot` has blocks for `new_lengths[h]` tokens."""
        have = [-(-n // self.bs) for n in self.host[slot]]
        want = [-(-n // self.bs) for n in new_lengths]
        missing = sum(max(0, w - h) for w, h in zip(want, have))
        if missing == 0:
            return
        self._widen(max(want))  # room for every new block first: one widening, one growth
        if len(self.free) < missing:
            self._grow(missing - len(self.free))
        for h, (w, hv) in enumerate(zip(want, have)):
            if w > hv:
                self._place(slot, h, hv, [self.free.pop() for _ in range(w - hv)])

    def _take_block(self, slot: int, head: int, j: int) -> None:
        """A free block becomes (slot, head)'s j-th, its next: a decode step's append when a head's last
        block is full (`reserve` of one block without its list arithmetic: ~1 us against ~20)."""
        if j >= self.table.shape[2]:
            self._widen(j + 1)
        if not self.free:
            self._grow(1)
        self._place(slot, head, j, [self.free.pop()])

    def _place(self, slot: int, head: int, j: int, ids: list[int]) -> None:
        """Blocks `ids` (popped from the free list's end: a freed run comes back in ascending order, see
        `_release`) become (slot, head)'s j-th on, in the host mirror and the table (room made already)."""
        self.blocks[slot][head].extend(ids)
        if self.on_cpu:
            self.table.numpy()[slot, head, j : j + len(ids)] = ids  # a view: no tensor op
        else:
            self.table[slot, head, j : j + len(ids)] = torch.tensor(ids, dtype=torch.int32)
        self.slot_blocks[slot] += len(ids)

    def _set_length(self, slot: int, head: int, n: int) -> None:
        self.host[slot][head] = n
        self._stale = True

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
        self._stale = True

    def step_rows(self, slots: list[int]) -> list[int]:
        """A decode step's append without the values: one more token for every head of each slot (blocks
        taken where a head's last one is full) -> the flat pool row of each (slot, head) new token, slot-
        major. The caller writes the values to those rows (`append_step`, or kernels/cpu_layer.c)."""
        return self._step_rows(slots)[0]

    def step(self, slots: list[int], slots_t: torch.Tensor):
        """`step_rows` and then `step_tables` in one pass over the lengths: (rows, table, lengths, longest
        head, shortest head), a fused decode layer's whole bookkeeping."""
        rows, mx, mn = self._step_rows(slots)
        return (rows, *self._tables(slots, slots_t, mx, mn))

    def _step_rows(self, slots: list[int]) -> tuple[list[int], int, int]:
        """-> `step_rows`' rows, and the longest and shortest head after the append."""
        bs, heads = self.bs, range(self.n_heads)
        rows, mx, mn = [], 0, 1 << 62
        for s in slots:
            lens, blocks = self.host[s], self.blocks[s]
            for h in heads:
                n = lens[h]
                j, off = divmod(n, bs)
                if off == 0:  # the head's last block is full (or it has none)
                    self._take_block(s, h, j)
                rows.append(blocks[h][j] * bs + off)
                lens[h] = n + 1
            mx, mn = max(mx, *lens), min(mn, *lens)
        if self._stale or not self.on_cpu or mx == mn:
            self._stale = True  # rebuilt when read; a step whose heads all hold mx tokens reads none
        else:  # the lengths tensor follows in place: a ragged layer's step reads it without a rebuild
            s0, lengths = slots[0], self._lengths.numpy()
            if slots[-1] - s0 == len(slots) - 1 and slots == list(range(s0, s0 + len(slots))):
                lengths[s0 : s0 + len(slots)] += 1  # a slice: ~20x cheaper than numpy's list indexing
            else:
                lengths[slots] += 1
        return rows, mx, mn

    def append_step(self, slots: list[int], slots_t: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """Append one token to every head of each slot. values[name]: (B, n_heads, *trailing) (B and heads
        may be strided or broadcast), or already flat (B * n_heads, *trailing).

        Where each token goes is host arithmetic on the mirrored table (a decode step's hot path: no
        tensor ops for the indices); the values go in with one index_copy_ per pool."""
        bs = self.bs
        rows = self.step_rows(slots)
        if self.native and all(cpu.scatter_ok(pool, values[n]) for n, pool in self.pools.items()):
            flat = cpu.rows_array(rows)  # one memcpy per row, no tensor ops (kernels/cpu.py)
            for name, pool in self.pools.items():
                cpu.scatter_rows(pool, values[name], flat)
            return
        flat = torch.tensor(rows, device=self.device)  # (B * H,) token rows of the flattened pools
        if self.impl == "triton":
            store_write(list(self.pools.values()), flat // bs, flat % bs,
                        [values[n].reshape(-1, *values[n].shape[2:]) for n in self.pools], impl="triton")
            return
        for name, pool in self.pools.items():
            val = values[name]
            val = val.reshape(-1, *val.shape[2:]) if val.dim() > pool.dim() - 1 else val
            pool.view(-1, *pool.shape[2:]).index_copy_(0, flat, val if val.dtype == pool.dtype else val.to(pool.dtype))

    def step_tables(self, slots: list[int], slots_t: torch.Tensor):
        """A decode step's view of the tables: (block table rows (B, H, MB), lengths (B, H) or None
        when every head holds the same number of tokens and the CPU reference needs no mask, longest
        head, shortest head), all from the host bookkeeping. Consecutive slots are views, not copies (read
        them before the next append: the lengths tensor is updated in place)."""
        lens = [n for s in slots for n in self.host[s]]
        return self._tables(slots, slots_t, max(lens), min(lens))

    def _tables(self, slots: list[int], slots_t: torch.Tensor, mx: int, mn: int):
        s0, B = slots[0], len(slots)
        run = slots == list(range(s0, s0 + B))
        table = self._run_view("table", self.table, s0, B) if run else self.table[slots_t]
        if mx == mn and self.impl != "triton":
            return table, None, mx, mn
        return table, self._run_view("lengths", self.lengths, s0, B) if run else self.lengths[slots_t], mx, mn

    def _run_view(self, name: str, t: torch.Tensor, s0: int, B: int) -> torch.Tensor:
        """t[s0 : s0 + B], the view kept while t (not rebuilt or widened since) and the run stay: every layer
        of every decode step asks for it."""
        v = self._views.get(name)
        if v is None or v[0] is not t or v[1] != s0 or v[2].shape[0] != B:
            v = self._views[name] = (t, s0, t[s0 : s0 + B])
        return v[2]

    def locate(self, slot: int, head: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Storage order indices of one (slot, head) -> (block ids, offsets)."""
        idx = idx.long()
        return self.table[slot, head, idx // self.bs].long(), idx % self.bs

    def locate_many(self, slot: int, heads: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Storage order indices `idx` of heads `heads` (same shape) of one slot -> (block ids, offsets)."""
        idx = idx.long()
        return self.table[slot][heads, idx // self.bs].long(), idx % self.bs

    def read_heads(self, slot: int, names=None) -> dict[str, torch.Tensor] | None:
        """Every head's stored tokens at once, (n_heads, n, *trailing) per pool (or the pools `names`),
        when the heads hold the same number n; None when they differ. One copy of the slot's blocks a pool."""
        lens = self.host[slot]
        n = lens[0]
        if any(m != n for m in lens):
            return None
        nb = -(-n // self.bs)
        ids = self.table[slot, :, :nb].reshape(-1).long()
        names = list(self.pools) if names is None else list(names)
        out = {}
        for name in names:
            pool = self.pools[name]
            out[name] = index_rows(pool, ids).view(self.n_heads, nb * self.bs, *pool.shape[2:])[:, :n]
        return out

    def read(self, slot: int, head: int, idx: torch.Tensor | None = None, names=None) -> dict[str, torch.Tensor]:
        """Every pool's (or the pools `names`') rows of `idx` (default: all stored tokens) of one (slot, head)."""
        if idx is None:
            idx = torch.arange(self.host[slot][head], device=self.device)
        names = list(self.pools) if names is None else list(names)
        return dict(zip(names, store_gather([self.pools[n] for n in names], *self.locate(slot, head, idx))))

    def write(self, slot: int, head: int, idx: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """Overwrite stored tokens in place. values[name]: (len(idx), *trailing) for every pool."""
        store_write(list(self.pools.values()), *self.locate(slot, head, idx), [values[n] for n in self.pools])

    def read_many(self, slot: int, heads: torch.Tensor, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """`read` for tokens of several heads at once: token n is row idx[n] of head heads[n]."""
        return dict(zip(self.pools, store_gather(list(self.pools.values()), *self.locate_many(slot, heads, idx))))

    def write_many(self, slot: int, heads: torch.Tensor, idx: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """`write` for tokens of several heads at once: token n is row idx[n] of head heads[n]."""
        store_write(list(self.pools.values()), *self.locate_many(slot, heads, idx), [values[n] for n in self.pools])

    def compact(self, slot: int, keep: list[torch.Tensor]) -> None:
        """Keep only `keep[h]` (sorted storage indices) of each head of `slot`; free emptied blocks. Every
        changed head's kept rows are gathered in one copy per pool, then written to the heads' first slots."""
        moved = [(h, idx) for h, idx in enumerate(keep) if int(idx.numel()) != self.host[slot][h]]
        if not moved:
            return
        sizes = [int(idx.numel()) for _, idx in moved]
        heads = torch.tensor([h for h, _ in moved], device=self.device).repeat_interleave(
            torch.tensor(sizes, device=self.device))
        src = self.locate_many(slot, heads, torch.cat([idx for _, idx in moved]))
        dst = self.locate_many(slot, heads, torch.cat([torch.arange(n, device=self.device) for n in sizes]))
        pools = list(self.pools.values())
        store_write(pools, *dst, store_gather(pools, *src))
        for h, idx in moved:
            self._release(slot, h, int(idx.numel()), self.host[slot][h])

    def compact_native(self, slot: int, keep: torch.Tensor, gone: torch.Tensor, into=None, w=None,
                       self_w: float | torch.Tensor = 1.0, heads: list[int] | None = None) -> None:
        """`compact` of a slot whose heads (or `heads` alone) all keep C tokens (keep (H, C)), gone (H, E) the
        dropped ones, in place in one native call; with `into` and `w`, the dropped tokens merge into kept
        ones first (`cpu_evict.merge_compact`: the first two pools are the keys and values)."""
        C = keep.shape[1]
        table = self.table[slot] if heads is None else self.table[slot][heads]
        cpu_evict.merge_compact(list(self.pools.values()), table, keep, gone, into, w, self_w)
        for h in range(self.n_heads) if heads is None else heads:
            self._release(slot, h, C, self.host[slot][h])

    def _release(self, slot: int, head: int, n: int, n_old: int) -> None:
        have, want = -(-n_old // self.bs), -(-n // self.bs)
        if want < have:
            # reversed: `_take_block` pops from the end, so a freed run is handed out again in ascending order (the
            # attention kernel reads a head's blocks at twice the speed when they ascend: the prefetchers follow)
            self.free.extend(reversed(self.blocks[slot][head][want:have]))
            del self.blocks[slot][head][want:]
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
        nxt = iter(range(n_used))  # the same numbering as the table: slot, head, block order
        self.blocks = [[[next(nxt) for _ in row] for row in slot] for slot in self.blocks]
        self.free = list(range(new_cap - 1, n_used - 1, -1))
