"""All layers' stores for a set of slots, and the byte accounting the CLI reports.

`bytes_full` is what an uncompressed cache in the model's dtype would hold for the same sequences at the
same moment: tokens seen x layers x 2 x kv_heads x head_dim x dtype size. A layer that reads another
layer's store (KVSharer) is an alias and owns nothing; shared storage is counted once.
"""

from __future__ import annotations


from kvchat.cache.store import LayerStore


class KVStore:
    def __init__(self, desc, n_slots: int, block_size: int = 16, with_bias=False, aliases: dict[int, int] | None = None):
        self.desc = desc
        self.n_slots = n_slots
        self.block_size = block_size
        self.aliases = dict(aliases or {})  # layer -> layer whose store it reads
        own = {}
        for l in range(desc.n_layers):
            if l not in self.aliases:
                own[l] = LayerStore(n_slots, desc.n_kv_heads, desc.head_dim, block_size, desc.dtype, desc.device,
                                    with_bias=with_bias)
        self._own = own
        self.layers = [own[self.aliases.get(l, l)] for l in range(desc.n_layers)]
        self.seen = [0] * n_slots  # tokens each slot's sequence has processed (what a full cache holds)
        self.peak_held = 0
        self.peak_full = 0
        self.slot_peak_held = [0] * n_slots
        self.slot_peak_full = [0] * n_slots
        self.n_notes = self.sum_held = self.sum_full = 0  # for averages over a run (batch summary)

    def owned(self) -> list[LayerStore]:
        return list(self._own.values())

    def owns(self, layer: int) -> bool:
        return layer not in self.aliases

    # ---- accounting --------------------------------------------------------------------------------
    def bytes_held(self) -> int:
        return sum(s.bytes_held() for s in self.owned())

    def bytes_reserved(self) -> int:
        return sum(s.bytes_reserved() for s in self.owned())

    def bytes_full(self) -> int:
        return sum(self.seen) * self.desc.kv_bytes_per_token

    def slot_held(self, slot: int) -> int:
        return sum(s.bytes_held_slot(slot) for s in self.owned())

    def slot_full(self, slot: int) -> int:
        return self.seen[slot] * self.desc.kv_bytes_per_token

    def note(self, slots) -> None:
        """Update peaks (and running sums for averages) after a step touching `slots`."""
        held, full = self.bytes_held(), self.bytes_full()
        self.peak_held = max(self.peak_held, held)
        self.peak_full = max(self.peak_full, full)
        self.n_notes += 1
        self.sum_held += held
        self.sum_full += full
        for s in slots:
            self.slot_peak_held[s] = max(self.slot_peak_held[s], self.slot_held(s))
            self.slot_peak_full[s] = max(self.slot_peak_full[s], self.slot_full(s))

    def tokens_kept(self, slot: int) -> list[list[int]]:
        """Per layer, per kv head: tokens stored for `slot` (aliases report their source's store)."""
        return [s.lengths[slot].tolist() for s in self.layers]

    # ---- slot lifecycle ----------------------------------------------------------------------------
    def free_slot(self, slot: int) -> None:
        for s in self.owned():
            s.free_slot(slot)
        self.seen[slot] = 0
        self.slot_peak_held[slot] = 0
        self.slot_peak_full[slot] = 0

    def trim(self) -> None:
        for s in self.owned():
            s.trim()
