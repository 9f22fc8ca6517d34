"""All layers' storage for a set of slots: formats per layer, aliases, compaction events, byte accounting.

A layer either owns a format (dense by default; a profile's format method may give it another) or is an
alias: it reads an earlier layer's store and owns nothing (KVSharer). Methods address storage by layer
through this object. `compact` is an event: the format compacts, the step's statistics of that layer
follow, and every listener's `on_compact(layer, slot, keep)` remaps its per-token state.

`bytes_full` is what an uncompressed cache in the model's dtype would hold for the same sequences at the
same moment: tokens seen x layers x 2 x kv_heads x head_dim x dtype size. Shared storage is counted once.
"""

from __future__ import annotations

import torch

from kvchat.cache.dense import DenseFormat
from kvchat.cache.format import Format, Merge, Tokens
from kvchat.cache.stats import StepStats


class KVStore:
    def __init__(self, desc, n_slots: int, block_size: int = 16, with_bias: bool = False,
                 aliases: dict[int, int] | None = None, formats: dict[int, Format] | None = None, listeners=()):
        self.desc = desc
        self.n_slots = n_slots
        self.block_size = block_size
        self.aliases = dict(aliases or {})  # layer -> earlier layer whose store it reads (no chains)
        formats = dict(formats or {})
        self._own: dict[int, Format] = {}
        for l in range(desc.n_layers):
            if l not in self.aliases:
                self._own[l] = formats.pop(l, None) or DenseFormat(
                    n_slots, desc.n_kv_heads, desc.head_dim, block_size, desc.dtype, desc.device, with_bias)
        self.layers = [self._own[self.owner(l)] for l in range(desc.n_layers)]
        self.listeners = list(listeners)
        self.stats: dict[int, StepStats] = {}  # this step's statistics per layer (set by the forward)
        self.chunk_start: dict[int, list[int]] = {}  # per owned layer: where the current chunk begins
        self.seen = [0] * n_slots  # tokens each slot's sequence has processed (what a full cache holds)
        self.peak_held = 0
        self.peak_full = 0
        self.slot_peak_held = [0] * n_slots
        self.slot_peak_full = [0] * n_slots
        self.n_notes = self.sum_held = self.sum_full = 0  # for averages over a run (batch summary)

    # ---- layout ------------------------------------------------------------------------------------
    def owner(self, layer: int) -> int:
        return self.aliases.get(layer, layer)

    def owns(self, layer: int) -> bool:
        return layer not in self.aliases

    def owned(self) -> list[Format]:
        return list(self._own.values())

    def owned_layers(self) -> list[int]:
        return list(self._own)

    def format(self, layer: int) -> Format:
        return self.layers[layer]

    # ---- tokens, by layer --------------------------------------------------------------------------
    def lengths(self, layer: int, slot: int) -> list[int]:
        """Tokens held per KV head (a Python list: no device sync)."""
        return self.layers[layer].host[slot]

    def read(self, layer: int, slot: int, head: int, idx: torch.Tensor | None = None) -> Tokens:
        return self.layers[layer].read(slot, head, idx)

    def positions(self, layer: int, slot: int, head: int) -> torch.Tensor:
        """(n,) int32 original positions of one (slot, kv head)'s tokens: `read(...).pos` without the K/V."""
        return self.layers[layer].positions(slot, head)

    def write(self, layer: int, slot: int, head: int, idx: torch.Tensor, tokens: Tokens) -> None:
        self.layers[layer].write(slot, head, idx, tokens)

    def read_heads(self, layer: int, slot: int) -> Tokens | None:
        """Every KV head's tokens at once ((H, n, ...) each) when the heads hold the same number; else None."""
        return self.layers[layer].read_heads(slot)

    def read_many(self, layer: int, slot: int, heads: torch.Tensor, idx: torch.Tensor) -> Tokens:
        """Tokens of several heads: token n is storage index idx[n] of KV head heads[n]; (N, ...) each."""
        return self.layers[layer].read_many(slot, heads, idx)

    def write_many(self, layer: int, slot: int, heads: torch.Tensor, idx: torch.Tensor, tokens: Tokens) -> None:
        """Overwrite tokens of several heads: token n is storage index idx[n] of KV head heads[n]."""
        self.layers[layer].write_many(slot, heads, idx, tokens)

    def native_evict(self, layer: int) -> bool:
        """`similar` and `compact` with a merge take `layer`'s format (DenseFormat on the CPU)."""
        return self.layers[layer].native_evict

    def similar(self, layer: int, slot: int, keep: torch.Tensor, gone: torch.Tensor):
        """Where `native_evict`: each gone key's best cosine against the kept keys of its head, and its index."""
        return self.layers[layer].similar(slot, keep, gone)

    def compact(self, layer: int, slot: int, keep: list[torch.Tensor], merge: Merge | None = None) -> None:
        """Keep only `keep[h]` (sorted storage indices) of each KV head of (`layer`'s owner, `slot`); `merge`
        (formats with `native_evict`) folds the dropped tokens into kept ones first."""
        owner = self.owner(layer)
        keep = [k.long() for k in keep]
        before = list(self.layers[owner].host[slot])
        if all(int(k.numel()) == n for k, n in zip(keep, before)):
            return  # keeps everything (indices are sorted and unique): nothing moves
        if merge is None:
            self.layers[owner].compact(slot, keep)
        else:
            self.layers[owner].compact(slot, keep, merge)
        for l, st in self.stats.items():
            if self.owner(l) == owner:
                st.remap(slot, keep)
        for m in self.listeners:
            m.on_compact(owner, slot, keep, before)

    def seal(self, slots: list[int]) -> None:
        for f in self.owned():
            f.seal(slots)

    # ---- accounting --------------------------------------------------------------------------------
    def bytes_held(self) -> int:
        return sum(f.bytes_held() for f in self.owned())

    def bytes_reserved(self) -> int:
        return sum(f.bytes_reserved() for f in self.owned())

    def bytes_full(self) -> int:
        return sum(self.seen) * self.desc.kv_bytes_per_token

    def slot_held(self, slot: int) -> int:
        return sum(f.bytes_held_slot(slot) for f in self.owned())

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
        return [f.tokens_held(slot) for f in self.layers]

    # ---- slot lifecycle ----------------------------------------------------------------------------
    def free_slot(self, slot: int) -> None:
        for f in self.owned():
            f.free_slot(slot)
        self.seen[slot] = 0
        self.slot_peak_held[slot] = 0
        self.slot_peak_full[slot] = 0
        for m in self.listeners:
            m.on_free(slot)

    def trim(self) -> None:
        for f in self.owned():
            f.trim()
