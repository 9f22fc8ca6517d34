"""A full-precision tail beside sealed groups: the base of every format that encodes tokens.

Per (slot, kv head) the storage order is [pinned][sealed][recent]:
- pinned: the first `pinned` tokens (attention sinks, a compensation token), never sealed, so a policy
  that rewrites them (RazorAttention's running mean) never re-encodes anything;
- sealed: groups of `group` tokens encoded by the subclass (quantized, low-rank...). One group is one
  block of the sealed pools, with per-token rows and per-group rows (e.g. per-channel scales). Eviction
  keeps any subset of a group: the kept rows move to the front of their block and the group's count
  drops, so nothing is ever re-encoded (a group's scales stay valid for the tokens left in it);
- recent: the newest tokens in the model's dtype. Once `residual` + `group` of them sit past the pinned
  ones, the oldest `group` are sealed (after the step's policies ran: `seal`).
The pinned and recent tokens live in a dense `tail` (DenseFormat, with the bias pool when a method asks).

Attention is the tail's part and the sealed part, each an exact partial softmax, merged by log-sum-exp;
the sealed part decodes `chunk_groups` groups at a time inside the loop, never a whole layer at once.
Statistics (prefill rows, decode column sums) come back in storage order like every format's.
"""

from __future__ import annotations

import math

import torch

from kvchat_kernels.prefill_attention import visible_limits
from kvchat.cache.attention import Part, causal_attention, merge, partial
from kvchat.cache.dense import DenseFormat
from kvchat.cache.format import Format, Tokens


class SealedFormat(Format):
    name = "sealed"
    chunk_groups = 16  # groups decoded per step of the attention loop

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

    # ---- what a subclass defines -------------------------------------------------------------------
    def token_specs(self) -> dict:
        """Per-token pools of a sealed group: name -> (trailing shape, dtype)."""
        raise NotImplementedError

    def group_specs(self) -> dict:
        """Per-group pools (e.g. per-channel scales): name -> (shape, dtype)."""
        return {}

    def encode(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, count: torch.Tensor) -> tuple[dict, dict]:
        """k, v (N, group, D) in the model's dtype (keys after RoPE), pos (N, group) int32, count (N,)
        tokens held per group (rows past it are padding: leave them out of any statistic)
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
                n = (n_tail - start - self.residual) // G
                if n <= 0:
                    continue
                idx = torch.arange(start, start + n * G, device=self.device)
                t = self.tail.read(slot, h, idx)
                if t.bias is not None and bool((t.bias != 0).any()):
                    raise ValueError("a token with a logit bias reached a sealed group; pin it (Method.pinned)")
                tok, grp = self.encode(t.k.view(n, G, -1), t.v.view(n, G, -1), t.pos.view(n, G),
                                       torch.full((n,), G, device=self.device))
                ids = self._alloc(n)
                ix = torch.tensor(ids, device=self.device)
                for name, rows in tok.items():
                    self.tok[name][ix] = rows.to(self.tok[name].dtype)
                self.tok["pos"][ix] = t.pos.view(n, G).to(torch.int32)
                for name, rows in grp.items():
                    self.grp[name][ix] = rows.to(self.grp[name].dtype)
                self.groups[slot][h].extend(ids)
                self.counts[slot][h].extend([G] * n)
                self.slot_groups[slot] += n
                keep = torch.cat([torch.arange(start), torch.arange(start + n * G, n_tail)])
                self.tail.compact(slot, [keep if hh == h else torch.arange(self.tail.host[slot][hh])
                                         for hh in range(self.n_kv)])

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

    def trim(self) -> None:
        self.tail.trim()

    # ---- attention ---------------------------------------------------------------------------------
    def _layout(self, slot: int, head: int):
        """Storage indices of (tail tokens, sealed tokens in group order) for statistics."""
        npin, ns, nt = self.n_pin[slot][head], self.n_sealed(slot, head), self.tail.host[slot][head]
        tail = torch.cat([torch.arange(npin), torch.arange(npin + ns, nt + ns)])
        return tail, npin

    def _sealed_parts(self, qg: torch.Tensor, slots: list[int], scale: float, visible=None):
        """Partial attention over each (slot, head)'s sealed groups, `chunk_groups` at a time.

        qg (B, H_kv, R, D) queries of each slot (R = G x queries); -> Part over (B, H_kv, R), and the
        per-chunk scores (for statistics) as a list of (scores (B, H_kv, R, C*group), valid mask)."""
        B, H, R, D = qg.shape
        G = self.group
        n_max = max((len(self.groups[s][h]) for s in slots for h in range(H)), default=0)
        part, chunks = None, []
        for c0 in range(0, n_max, self.chunk_groups):
            C = min(self.chunk_groups, n_max - c0)
            ids = torch.zeros(B, H, C, dtype=torch.long)
            cnt = torch.zeros(B, H, C, dtype=torch.long)
            for b, s in enumerate(slots):
                for h in range(H):
                    g = self.groups[s][h][c0 : c0 + C]
                    ids[b, h, : len(g)] = torch.tensor(g, dtype=torch.long)
                    cnt[b, h, : len(g)] = torch.tensor(self.counts[s][h][c0 : c0 + C], dtype=torch.long)
            k, v, _ = self._decoded(ids.flatten())
            k = k.view(B, H, C * G, D).to(qg.dtype)
            v = v.view(B, H, C * G, D).to(qg.dtype)
            valid = (torch.arange(G).view(1, 1, 1, G) < cnt.unsqueeze(-1)).view(B, H, 1, C * G).to(self.device)
            scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # (B, H, R, C*G)
            scores = scores.masked_fill(~valid, float("-inf"))
            p = partial(scores, v)
            part = p if part is None else Part(*merge_parts(part, p))
            chunks.append((scores, valid))
        return part, chunks

    def attend_decode(self, q, slots_t, scale, colsum=False):
        slots = slots_t.tolist()
        B, Hq, D = q.shape
        H = self.n_kv
        G = Hq // H
        qg = q.view(B, H, G, D)
        tl = self.tail
        bt = tl.pages.table[slots_t]
        n_blocks = max(1, -(-max(max(tl.host[s]) for s in slots) // self.block_size))
        bt = bt[:, :, :n_blocks].reshape(-1).long()
        kt = tl.k.index_select(0, bt).view(B, H, -1, D).to(q.dtype)
        vt = tl.v.index_select(0, bt).view(B, H, -1, D).to(q.dtype)
        Tt = kt.shape[2]
        s_tail = torch.matmul(qg, kt.transpose(-1, -2)).float() * scale  # (B, H, G, Tt)
        if tl.bias is not None:
            s_tail = s_tail + tl.bias.index_select(0, bt).view(B, H, 1, Tt).float()
        lens = tl.pages.lengths[slots_t].view(B, H, 1, 1)
        s_tail = s_tail.masked_fill(torch.arange(Tt, device=q.device).view(1, 1, 1, Tt) >= lens, float("-inf"))
        parts = [partial(s_tail, vt)]
        sealed, chunks = self._sealed_parts(qg, slots, scale)
        if sealed is not None:
            parts.append(sealed)
        out, lse = merge(parts)
        out = out.to(q.dtype).view(B, Hq, D)
        if not colsum:
            return out, None
        T = max(max(self.host[s]) for s in slots)
        col = torch.zeros(B, H, max(T, 1), device=q.device)
        for b, s in enumerate(slots):
            for h in range(H):
                tail_at, npin = self._layout(s, h)
                nt = tail_at.numel()
                col[b, h, tail_at] = torch.exp(s_tail[b, h, :, :nt] - lse[b, h].unsqueeze(-1)).sum(0)
                at, off = npin, 0
                for scores, valid in chunks:
                    pr = torch.exp(scores[b, h] - lse[b, h].unsqueeze(-1)).sum(0)[valid[b, h, 0]]
                    col[b, h, at : at + pr.numel()] = pr
                    at += pr.numel()
        return out, col

    def attend_prefill(self, q, slot, q_pos, scale, last_w, fresh=None):
        """The chunk is in the tail (nothing is sealed during a chunk), sealed tokens are older than every
        query: the sealed part is visible to all, the tail part causal by position."""
        T, Hq, D = q.shape
        H = self.n_kv
        G = Hq // H
        tl = self.tail
        if fresh is not None and not any(self.groups[slot]) and all(n == T for n in tl.host[slot]):
            return causal_attention(q, *fresh, scale, last_w)  # a first chunk: nothing else is stored
        pos_t, lens_t = tl.stored_positions(slot)

        limits = visible_limits(pos_t, lens_t, q_pos)  # (H, T)
        n_blocks = max(1, -(-max(tl.host[slot]) // self.block_size))
        bt = tl.pages.table[slot, :, :n_blocks].reshape(-1).long()
        kt = tl.k.index_select(0, bt).view(H, -1, D).to(q.dtype)
        vt = tl.v.index_select(0, bt).view(H, -1, D).to(q.dtype)
        bias = tl.bias.index_select(0, bt).view(H, 1, -1).float() if tl.bias is not None else None
        Lt = kt.shape[1]
        out = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device)
        w = min(last_w, T) if last_w > 0 else 0
        rows = None
        if w:
            L = max(max(self.host[slot]), 1)
            rows = torch.zeros(Hq, w, L, device=q.device)
        tile = 256
        for i0 in range(0, T, tile):
            i1 = min(T, i0 + tile)
            qg = q[i0:i1].permute(1, 0, 2).reshape(H, G, i1 - i0, D).reshape(H, G * (i1 - i0), D)
            s_tail = torch.matmul(qg, kt.transpose(-1, -2)).float().view(H, G, i1 - i0, Lt) * scale
            if bias is not None:
                s_tail = s_tail + bias.view(H, 1, 1, Lt)
            vis = torch.arange(Lt, device=q.device).view(1, 1, Lt) < limits[:, i0:i1].unsqueeze(-1)
            s_tail = s_tail.masked_fill(~vis.unsqueeze(1), float("-inf")).view(H, G * (i1 - i0), Lt)
            parts = [partial(s_tail, vt)]
            sealed, chunks = self._sealed_parts(qg.unsqueeze(0), [slot], scale)
            if sealed is not None:
                parts.append(Part(sealed.m[0], sealed.l[0], sealed.acc[0]))
            o, lse = merge(parts)  # (H, G*n, D), (H, G*n)
            out[i0:i1] = o.view(H, G, i1 - i0, D).permute(2, 0, 1, 3).reshape(i1 - i0, Hq, D).to(q.dtype)
            if w and i1 > T - w:
                self._prefill_rows(rows, slot, s_tail, chunks, lse, i0, i1, T, w, G)
        return out, rows

    def _prefill_rows(self, rows, slot, s_tail, chunks, lse, i0, i1, T, w, G):
        """Scatter the probabilities of the last w queries that fall in tile [i0, i1) to storage order."""
        H, n = self.n_kv, i1 - i0
        lo = max(i0, T - w)
        for h in range(H):
            tail_at, npin = self._layout(slot, h)
            nt = tail_at.numel()
            sel = torch.arange(lo - i0, n)  # tile rows that are among the last w
            lh = lse[h].view(G, n)[:, sel]  # (G, r)
            st = s_tail[h].view(G, n, -1)[:, sel, :nt]
            rows[h * G : (h + 1) * G, lo - (T - w) :, tail_at] = torch.exp(st - lh.unsqueeze(-1))
            at = npin
            for scores, valid in chunks:
                sc = scores[0, h].view(G, n, -1)[:, sel][:, :, valid[0, h, 0]]
                rows[h * G : (h + 1) * G, lo - (T - w) :, at : at + sc.shape[-1]] = torch.exp(sc - lh.unsqueeze(-1))
                at += sc.shape[-1]

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
        per = sum(t[0].nbytes for t in self.tok.values()) + sum(t[0].nbytes for t in self.grp.values())
        return self.tail.storage_bytes() + len(used) * per + 8 * len(used)


def merge_parts(a: Part, b: Part) -> Part:
    """Two partial softmaxes of the same queries -> one (unnormalized, like its inputs)."""
    m = torch.maximum(a.m, b.m)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(a.m - m_safe), torch.exp(b.m - m_safe)
    return Part(m, a.l * wa + b.l * wb, a.acc * wa.unsqueeze(-1) + b.acc * wb.unsqueeze(-1))
