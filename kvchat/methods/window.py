"""window: StreamingLLM-style attention sinks plus a recent window (https://arxiv.org/abs/2309.17453).

Keeps the first `sink` tokens and the last `recent` tokens of every head and evicts the rest, after each
prefill chunk and as decode goes on. Eviction runs once a block's worth of tokens has piled up past the
window, so its cost is amortized and the bytes held stay flat. Keys keep their original RoPE positions.
Multi-turn: earlier turns slide out of the window like any other tokens; only the sinks stay.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvchat.methods.base import Method


@dataclass
class Window(Method):
    name = "window"
    sink: int = 4
    recent: int = 256

    def __post_init__(self):
        self._int("sink", lo=0)
        self._int("recent", lo=1)

    @classmethod
    def keep_all(cls) -> "Window":
        return cls(recent=10**9)

    def pinned(self) -> int:
        return self.sink

    def _evict(self, store, slots, slack: int) -> None:
        limit = self.sink + self.recent
        for layer in store.owned_layers():
            for s in slots:
                heads = store.lengths(layer, s)
                if max(heads) < limit + slack:
                    continue
                keep = [
                    torch.cat([torch.arange(min(self.sink, n)), torch.arange(max(self.sink, n - self.recent), n)])
                    if n > limit else torch.arange(n)
                    for n in heads
                ]
                store.compact(layer, s, keep)

    def after_prefill(self, store, slot: int) -> None:
        self._evict(store, [slot], slack=1)

    def after_decode(self, store, slots) -> None:
        # Wait for a block's worth past the window: one compaction per block_size steps.
        self._evict(store, slots, slack=store.block_size)
