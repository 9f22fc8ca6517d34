"""The attention statistics of one layer's step, kept in storage order while methods compact.

Prefill: `rows` (H_q, w, L), the attention probabilities of one slot's chunk's last w queries over its
stored tokens. Decode: `colsum` (B, H_kv, T), the mass each stored token of each step slot received.
Methods read them after the layer ran; when one of them compacts a (slot, head), `remap` moves the
statistics with the tokens, so a method running after another one's eviction reads current indices.
"""

from __future__ import annotations

import torch


class StepStats:
    def __init__(self, group: int, rows=None, slot: int | None = None, colsum=None, slots=None):
        self.group = group  # query heads per KV head
        self.rows, self.slot = rows, slot
        self.colsum, self.slots = colsum, list(slots) if slots is not None else []

    def remap(self, slot: int, keep: list[torch.Tensor]) -> None:
        if self.rows is not None and slot == self.slot:
            G = self.group
            Hq, w, _ = self.rows.shape
            L = max((int(k.numel()) for k in keep), default=0)
            new = self.rows.new_zeros(Hq, w, max(L, 1))
            for h, idx in enumerate(keep):
                n = idx.numel()
                new[h * G : (h + 1) * G, :, :n] = self.rows[h * G : (h + 1) * G, :, idx.long()]
            self.rows = new
        if self.colsum is not None and slot in self.slots:
            b = self.slots.index(slot)
            row = self.colsum[b].clone()
            self.colsum[b].zero_()
            for h, idx in enumerate(keep):
                self.colsum[b, h, : idx.numel()] = row[h, idx.long()]


def add_colsum(into: torch.Tensor, slots: list[int], colsum: torch.Tensor) -> None:
    """Add a step's column sums (B, H_kv, T) into a method's running scores (n_slots, H_kv, cap), row
    slots[b] for slot b, tokens below min(T, cap) (past a head's length both sides are 0)."""
    T = min(into.shape[2], colsum.shape[2])
    s0 = slots[0]
    if slots == list(range(s0, s0 + len(slots))):
        into[s0 : s0 + len(slots), :, :T] += colsum[:, :, :T]
    else:
        into[:, :, :T].index_add_(0, torch.tensor(slots), colsum[:, :, :T])
