"""Attention over a sealed format: the tail's part and the sealed part, merged by log-sum-exp.

The sealed part decodes `chunk_groups` groups at a time inside the loop, never a whole layer at once
(a format with a kernel overrides `attend_decode`). Statistics (prefill rows, decode column sums) come
back in storage order, [pinned][sealed][recent], like every format's.
"""

from __future__ import annotations

import torch

from kvchat.cache.attention import Part, causal_attention, merge, partial
from kvchat_kernels.prefill_attention import visible_limits
from kvchat_kernels.store_ops import index_rows


class SealedAttention:
    """Mixin of SealedFormat: reads its tail, group tables and `decode`."""

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
        if n_max:
            table, counts, _, _ = self.group_tables()
            rows = torch.tensor(slots, device=self.device)
            table, counts = table[rows], counts[rows]  # (B, H, MG)
        for c0 in range(0, n_max, self.chunk_groups):
            C = min(self.chunk_groups, n_max - c0)
            ids, cnt = table[:, :, c0 : c0 + C], counts[:, :, c0 : c0 + C]
            k, v, _ = self._decoded(ids.reshape(-1).long())
            k = k.view(B, H, C * G, D).to(qg.dtype)
            v = v.view(B, H, C * G, D).to(qg.dtype)
            valid = (torch.arange(G, device=self.device).view(1, 1, 1, G) < cnt.unsqueeze(-1)).view(B, H, 1, C * G)
            scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # (B, H, R, C*G)
            scores = scores.masked_fill(~valid, float("-inf"))
            p = partial(scores, v)
            part = p if part is None else Part(*merge_parts(part, p))
            chunks.append((scores, valid))
        return part, chunks

    def attend_decode(self, q, slots, slots_t, scale, colsum=False):
        B, Hq, D = q.shape
        H = self.n_kv
        G = Hq // H
        qg = q.view(B, H, G, D)
        tl = self.tail
        bt = tl.pages.table[slots_t]
        n_blocks = max(1, -(-max(max(tl.host[s]) for s in slots) // self.block_size))
        bt = bt[:, :, :n_blocks].reshape(-1).long()
        kt = index_rows(tl.k, bt).view(B, H, -1, D).to(q.dtype)
        vt = index_rows(tl.v, bt).view(B, H, -1, D).to(q.dtype)
        Tt = kt.shape[2]
        s_tail = torch.matmul(qg, kt.transpose(-1, -2)).float() * scale  # (B, H, G, Tt)
        if tl.bias is not None:
            s_tail = s_tail + index_rows(tl.bias, bt).view(B, H, 1, Tt).float()
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
        kt = index_rows(tl.k, bt).view(H, -1, D).to(q.dtype)
        vt = index_rows(tl.v, bt).view(H, -1, D).to(q.dtype)
        bias = index_rows(tl.bias, bt).view(H, 1, -1).float() if tl.bias is not None else None
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


def merge_parts(a: Part, b: Part) -> Part:
    """Two partial softmaxes of the same queries -> one (unnormalized, like its inputs)."""
    m = torch.maximum(a.m, b.m)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(a.m - m_safe), torch.exp(b.m - m_safe)
    return Part(m, a.l * wa + b.l * wb, a.acc * wa.unsqueeze(-1) + b.acc * wb.unsqueeze(-1))
