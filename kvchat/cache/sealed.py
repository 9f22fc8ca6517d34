"""A full-precision tail beside sealed groups: the base of every format that encodes tokens.

Per (slot, kv head) the storage order is [pinned][sealed][recent]:
- pinned: the first `pinned` tokens (attention sinks, a compensation token), never sealed, so a policy
  that rewrites them (RazorAttention's running mean) never re-encodes anything;
- sealed: groups of `group` tokens encoded by the subclass (quantized, low-rank...). One group is one
  block of the sealed pools, with per-token rows and per-group rows (e.g. per-channel scales). Eviction
  keeps any subset of a group: the kept rows move to the front of their block and the group's count
  drops, so nothing is ever re-encoded (a group's scales stay valid for the tokens left in it);
- recent: the newest tokens in the model's dtype. Once `residual` + `group` of them sit past the pinned
  ones, the oldest are sealed a group at a time (after the step's policies ran: `seal`), so the tail
  holds `residual` to `residual + group - 1` of them. A token-wise format (its encoding is per token,
  no group rows) seals all but `residual`, topping up its newest group first.
The pinned and recent tokens live in a dense `tail` (DenseFormat, with the bias pool when a method asks).
`group_tables()` mirrors the groups and counts on the device for kernels.

Attention (sealed_attention.py) is the tail's part and the sealed part, each an exact partial softmax,
merged by log-sum-exp.
"""

from __future__ import annotations

import math

import torch

from kvchat.cache.dense import DenseFormat
from kvchat.cache.format import Format, Tokens
from kvchat.cache.sealed_attention import SealedAttention


class SealedFormat(SealedAttention, Format):
    name = "sealed"
    chunk_groups = 16  # groups decoded per step of the attention loop
    token_wise = False  # encode() is per token (no group rows): seal fills the newest group's free rows

    def __init__(self, n_slots, n_kv, head_dim, block_size, dtype, device, with_bias=False, *, group: int,
                 residual: int, pinned: int = 0):
        super().__init__(n_slots, n_kv, head_dim, block_size, dtype, device, with_bias)
        self.group, self.residual, self.pin = group, residual, pinned
        self.tail = DenseFormat(n_slots, n_kv, head_dim, block_size, dtype, device, with_bias)
        specs = dict(self.token_specs())
        specs["pos"] = ((), torch.int32)
        self.tok = {n: torch.zeros(0, group, *s, dtype=dt, device=device) for n, (s, dt) in specs.items()}
        self.grp = {n: torch.zeros(0, *s, dtype=dt, device=device) for n, (s, dt) in self.group_specs().items()}
        self.free: list[int] = []
        self.groups = [[[] for _ in range(n_kv)] for _ in range(n_slots)]  # block ids in storage order
        self.counts = [[[] for _ in range(n_kv)] for _ in range(n_slots)]  # tokens held in each
        self.n_pin = [[0] * n_kv for _ in range(n_slots)]
        self.host = [[0] * n_kv for _ in range(n_slots)]
        self.slot_groups = [0] * n_slots
        self._tables = None  # device copies of groups / counts / n_pin for kernels, rebuilt after a change

    # ---- what a subclass defines -------------------------------------------------------------------
    def token_specs(self) -> dict:
        """Per-token pools of a sealed group: name -> (trailing shape, dtype)."""
        raise NotImplementedError

    def group_specs(self) -> dict:
        """Per-group pools (e.g. per-channel scales): name -> (shape, dtype)."""
        return {}

    def encode(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, count: torch.Tensor) -> tuple[dict, dict]:
        """k, v (N, group, D) in the model's dtype (keys after RoPE), pos (N, group) int32, count (N,)
        tokens held per group (rows past it are padding: leave them out of any statistic; a token-wise
        format may also get padding rows before new ones, it encodes each row on its own)
        -> (token rows {name: (N, group, ...)}, group rows {name: (N, ...)})."""
        raise NotImplementedError

    def decode(self, tok: dict, grp: dict, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gathered rows of M groups -> k, v (M, group, D) in the model's dtype."""
        raise NotImplementedError

    # ---- bookkeeping -------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return next(iter(self.tok.values())).shape[0]

    @property
    def group_bytes(self) -> int:
        tok = sum(math.prod(t.shape[1:]) * t.element_size() for t in self.tok.values())
        return tok + sum(math.prod(t.shape[1:]) * t.element_size() for t in self.grp.values())

    def _alloc(self, n: int) -> list[int]:
        if len(self.free) < n:
            old = self.capacity
            new = old + max(n - len(self.free), old // 8, 4)
            for pools in (self.tok, self.grp):
                for name, t in pools.items():
                    grown = torch.zeros(new, *t.shape[1:], dtype=t.dtype, device=t.device)
                    grown[:old] = t
                    pools[name] = grown
            self.free = list(range(new - 1, old - 1, -1)) + self.free
        return [self.free.pop() for _ in range(n)]

    def _sync(self, slot: int) -> None:
        for h in range(self.n_kv):
            self.host[slot][h] = self.tail.host[slot][h] + sum(self.counts[slot][h])

    def n_sealed(self, slot: int, head: int) -> int:
        return sum(self.counts[slot][head])

    def group_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """On the device: group ids and counts (n_slots, n_kv, MG) int32 in storage order (0 past a
        head's groups), groups (n_slots, n_kv) and pinned tail tokens (n_slots, n_kv) int32."""
        if self._tables is None:
            mg = max(1, max(len(g) for row in self.groups for g in row))
            pad = lambda rows: [[r + [0] * (mg - len(r)) for r in hs] for hs in rows]  # noqa: E731
            table = torch.tensor(pad(self.groups), dtype=torch.int32)
            counts = torch.tensor(pad(self.counts), dtype=torch.int32)
            n = torch.tensor([[len(g) for g in hs] for hs in self.groups], dtype=torch.int32)
            npin = torch.tensor(self.n_pin, dtype=torch.int32)
            self._tables = tuple(t.to(self.device) for t in (table, counts, n, npin))
        return self._tables

    # ---- writes ------------------------------------------------------------------------------------
    def append_chunk(self, slot, k_pre, k, v, pos) -> None:
        self.tail.append_chunk(slot, k_pre, k, v, pos)
        self._sync(slot)

    def append_step(self, slots, slots_t, k_pre, k, v, pos) -> None:
        self.tail.append_step(slots, slots_t, k_pre, k, v, pos)
        for s in slots:
            row = self.host[s]
            for h in range(self.n_kv):
                row[h] += 1

    def seal(self, slots: list[int]) -> None:
        G = self.group
        for slot in slots:
            for h in range(self.n_kv):
                n_tail = self.tail.host[slot][h]
                if not self.groups[slot][h]:
                    self.n_pin[slot][h] = min(self.pin, n_tail)
                start = self.n_pin[slot][h]
                avail = n_tail - start - self.residual
                if avail < G:
                    continue
                self._seal_rows(slot, h, start, avail if self.token_wise else avail // G * G)

    def _seal_rows(self, slot: int, h: int, start: int, m: int) -> None:
        """Seal tail tokens [start, start + m) of (slot, h): whole groups, or for a token-wise format the
        newest group's free rows first and a partial group last (nothing waits in the tail)."""
        G = self.group
        groups, counts = self.groups[slot][h], self.counts[slot][h]
        c = counts[-1] if self.token_wise and groups and counts[-1] < G else 0
        n_touch = -(-(c + m) // G)
        ids = ([groups[-1]] if c else []) + self._alloc(n_touch - (1 if c else 0))
        t = self.tail.read(slot, h, torch.arange(start, start + m, device=self.device))
        if t.bias is not None and bool((t.bias != 0).any()):
            raise ValueError("a token with a logit bias reached a sealed group; pin it (Method.pinned)")
        at = c + torch.arange(m, device=self.device)  # row in the touched groups, laid end to end
        pad = lambda x: x.new_zeros(n_touch * G, *x.shape[1:]).index_copy_(0, at, x).view(n_touch, G, *x.shape[1:])  # noqa: E731
        fill = [min(G, c + m - i * G) for i in range(n_touch)]
        tok, grp = self.encode(pad(t.k), pad(t.v), pad(t.pos), torch.tensor(fill, device=self.device))
        ix = torch.tensor(ids, device=self.device)
        blocks, offs = ix[at // G], at % G
        for name, rows in tok.items():
            self.tok[name][blocks, offs] = rows.reshape(n_touch * G, *rows.shape[2:])[at].to(self.tok[name].dtype)
        self.tok["pos"][blocks, offs] = t.pos.to(torch.int32)
        for name, rows in grp.items():  # group rows: whole groups only (c == 0)
            self.grp[name][ix] = rows.to(self.grp[name].dtype)
        if c:
            counts[-1] = fill[0]
        groups.extend(ids[1 if c else 0 :])
        counts.extend(fill[1 if c else 0 :])
        self.slot_groups[slot] += n_touch - (1 if c else 0)
        self._tables = None
        n_tail = self.tail.host[slot][h]
        keep = torch.cat([torch.arange(start), torch.arange(start + m, n_tail)])
        self.tail.compact(slot, [keep if hh == h else torch.arange(self.tail.host[slot][hh]) for hh in range(self.n_kv)])

    # ---- tokens in storage order -------------------------------------------------------------------
    def _split(self, slot: int, head: int, idx: torch.Tensor):
        """Storage indices -> (tail indices, where they go), (sealed (block, offset), where they go)."""
        npin, ns = self.n_pin[slot][head], self.n_sealed(slot, head)
        idx = idx.long()
        sealed = (idx >= npin) & (idx < npin + ns)
        at_tail = (~sealed).nonzero().flatten()
        tail_idx = torch.where(idx[at_tail] < npin, idx[at_tail], idx[at_tail] - ns)
        at_sealed = sealed.nonzero().flatten()
        s = idx[at_sealed] - npin
        counts = torch.tensor(self.counts[slot][head], dtype=torch.long)
        ends = counts.cumsum(0)
        g = torch.searchsorted(ends, s, right=True)
        off = s - (ends - counts)[g] if s.numel() else s
        blocks = torch.tensor(self.groups[slot][head], dtype=torch.long)[g] if s.numel() else s
        return (tail_idx, at_tail), (blocks, off, at_sealed)

    def _decoded(self, blocks: torch.Tensor):
        ix = blocks.to(self.device)
        tok = {n: t[ix] for n, t in self.tok.items()}
        grp = {n: t[ix] for n, t in self.grp.items()}
        k, v = self.decode(tok, grp, tok["pos"])
        return k, v, tok["pos"]

    def read(self, slot: int, head: int, idx: torch.Tensor | None = None) -> Tokens:
        if idx is None:
            idx = torch.arange(self.host[slot][head])
        n = idx.numel()
        (tail_idx, at_tail), (blocks, off, at_sealed) = self._split(slot, head, idx)
        D = self.head_dim
        k = torch.empty(n, D, dtype=self.dtype, device=self.device)
        v = torch.empty_like(k)
        pos = torch.empty(n, dtype=torch.int32, device=self.device)
        bias = torch.zeros(n, device=self.device) if self.with_bias else None
        if at_tail.numel():
            t = self.tail.read(slot, head, tail_idx)
            k[at_tail], v[at_tail], pos[at_tail] = t.k, t.v, t.pos
            if bias is not None:
                bias[at_tail] = t.bias
        if at_sealed.numel():
            uniq, inv = torch.unique(blocks, return_inverse=True)
            gk, gv, gp = self._decoded(uniq)
            k[at_sealed], v[at_sealed], pos[at_sealed] = gk[inv, off], gv[inv, off], gp[inv, off]
        return Tokens(k, v, pos, bias)

    def write(self, slot: int, head: int, idx: torch.Tensor, tokens: Tokens) -> None:
        """Overwrite tokens; a sealed token's whole group is decoded, changed and encoded again (the
        only re-encoding there is: merges into sealed tokens, never eviction)."""
        (tail_idx, at_tail), (blocks, off, at_sealed) = self._split(slot, head, idx)
        if at_tail.numel():
            self.tail.write(slot, head, tail_idx, tokens.select(at_tail))
        if at_sealed.numel():
            if tokens.bias is not None and bool((tokens.bias[at_sealed] != 0).any()):
                raise ValueError("a logit bias cannot be written to a sealed token; pin it (Method.pinned)")
            uniq, inv = torch.unique(blocks, return_inverse=True)
            gk, gv, gp = self._decoded(uniq)
            gk[inv, off], gv[inv, off] = tokens.k[at_sealed].to(gk.dtype), tokens.v[at_sealed].to(gv.dtype)
            gp[inv, off] = tokens.pos[at_sealed].to(gp.dtype)
            count_of = {b: c for b, c in zip(self.groups[slot][head], self.counts[slot][head])}
            tok, grp = self.encode(gk, gv, gp, torch.tensor([count_of[int(b)] for b in uniq], device=self.device))
            ix = uniq.to(self.device)
            for name, rows in tok.items():
                self.tok[name][ix] = rows.to(self.tok[name].dtype)
            self.tok["pos"][ix] = gp
            for name, rows in grp.items():
                self.grp[name][ix] = rows.to(self.grp[name].dtype)

    def compact(self, slot: int, keep: list[torch.Tensor]) -> None:
        tail_keep = []
        for h, idx in enumerate(keep):
            idx = idx.long()
            npin, ns = self.n_pin[slot][h], self.n_sealed(slot, h)
            front, back = idx[idx < npin], idx[idx >= npin + ns] - ns
            tail_keep.append(torch.cat([front, back]))
            self.n_pin[slot][h] = int(front.numel())
            self._compact_sealed(slot, h, idx[(idx >= npin) & (idx < npin + ns)] - npin)
        self.tail.compact(slot, tail_keep)
        self._sync(slot)
        self._tables = None

    def _compact_sealed(self, slot: int, head: int, kept: torch.Tensor) -> None:
        """Keep sealed tokens `kept` (indices into the head's sealed tokens): per group, move the kept rows
        to the front of its block; free emptied groups."""
        groups, counts = self.groups[slot][head], self.counts[slot][head]
        new_g, new_c, start = [], [], 0
        for b, c in zip(groups, counts):
            sel = kept[(kept >= start) & (kept < start + c)] - start
            start += c
            if sel.numel() == 0:
                self.free.append(b)
                self.slot_groups[slot] -= 1
                continue
            if sel.numel() < c:
                for t in self.tok.values():
                    t[b, : sel.numel()] = t[b, sel.to(self.device)]
            new_g.append(b)
            new_c.append(int(sel.numel()))
        self.groups[slot][head], self.counts[slot][head] = new_g, new_c

    def free_slot(self, slot: int) -> None:
        for h in range(self.n_kv):
            self.free.extend(self.groups[slot][h])
            self.groups[slot][h], self.counts[slot][h] = [], []
            self.n_pin[slot][h] = 0
        self.slot_groups[slot] = 0
        self.tail.free_slot(slot)
        self._sync(slot)
        self._tables = None

    def trim(self) -> None:
        self.tail.trim()

    def check(self, slot: int) -> None:
        super().check(slot)
        self.tail.pages.check(slot)

    # ---- bytes -------------------------------------------------------------------------------------
    def meta_bytes(self) -> int:
        # per group: its block id and count (int32 each), as a kernel's tables would hold them
        return 8 * sum(self.slot_groups)

    def bytes_held(self) -> int:
        return self.tail.bytes_held() + sum(self.slot_groups) * self.group_bytes + self.meta_bytes()

    def bytes_held_slot(self, slot: int) -> int:
        return self.tail.bytes_held_slot(slot) + self.slot_groups[slot] * (self.group_bytes + 8)

    def bytes_reserved(self) -> int:
        pools = sum(t.nbytes for t in self.tok.values()) + sum(t.nbytes for t in self.grp.values())
        return self.tail.bytes_reserved() + pools + self.meta_bytes()

    def storage_bytes(self) -> int:
        """The storage behind what the tables reference, measured on the tensors (tests)."""
        used = {b for s in range(self.n_slots) for h in range(self.n_kv) for b in self.groups[s][h]}
        pools = [*self.tok.values(), *self.grp.values()]
        per = sum(t[0].nbytes for t in pools) if self.capacity else 0  # nothing sealed yet: no rows to measure
        return self.tail.storage_bytes() + len(used) * per + 8 * len(used)
