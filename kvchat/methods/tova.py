"""tova: TOVA, token-wise optimal value attention (https://arxiv.org/abs/2401.06104).

Each layer keeps a fixed budget of tokens and, whenever it is over, drops the tokens the current query
attends to least: no accumulated scores, no recent window, no per-layer schedule. At prefill the query is
the prompt's last `obs_window` queries (1 = the paper's last token), at decode the step's own query.
Scores are per KV head, the mean over its query group (`heads: kv`), or one score per token for the whole
layer, the mean over every query head as the paper does (`heads: layer`; the heads of a layer then keep
the same tokens). The budget is max(`min_budget`, `ratio` x tokens seen) per layer, recomputed after
every prefill chunk; the first `sink` positions always stay. Decode evicts a block's worth at once when a
head reaches budget + block_size tokens (the step's query scores the whole cache), so compaction is
amortized and a head holds at most one block over the budget.

The method keeps no per-token state: scores are read from the step's statistics (`store.stats`), which
follow every compaction.

On kvchat's generated tasks (benchmarks/bench_quality.py, tuning seeds, ratio 0.3) per KV head found
1/27, `heads: layer` 12/27, and `pool: 7` on top 19/24 (full 22/24): the shipped profile
(profiles/tova.yaml) uses both; `pool` is SnapKV's neighbour pooling, not in the paper.

Multi-turn: a new turn is appended, every stored token (earlier turns included) is scored by the new
turn's last queries, and each layer evicts back to the new budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kvchat.methods.base import Method, neighbour_max, per_layer


@dataclass
class TOVA(Method):
    name = "tova"
    ratio: float = 0.3
    min_budget: int = 128
    sink: int = 0
    obs_window: int = 1
    heads: str = "kv"
    pool: int = 1

    def __post_init__(self):
        self._float("ratio", lo=0.0, hi=1.0, lo_open=True)
        self._int("min_budget", lo=1)
        self._int("sink", lo=0)
        self._int("obs_window", lo=1)
        if self.heads not in ("kv", "layer"):
            raise self._err("heads", "must be kv or layer", self.heads)
        self._pool()
        self._budget: dict[int, int] = {}  # slot -> tokens each head keeps

    @classmethod
    def keep_all(cls) -> "TOVA":
        return cls(ratio=1.0, min_budget=10**9)  # the budget exceeds any prompt and reply: nothing is evicted

    def pinned(self) -> int:
        return self.sink

    def prefill_rows(self, layer: int) -> int:
        return self.obs_window

    def decode_colsum(self, layer: int) -> bool:
        return True

    def scores(self, store, layer: int, slot: int, mass: torch.Tensor) -> torch.Tensor:
        """mass (H_kv, L) attention each stored token got, summed over a KV group's query heads -> (H_kv, L)
        scores; `heads: layer` gives every head the layer's total where the heads hold the same tokens
        (another policy may have made them differ: then each head keeps its own)."""
        return per_layer(mass, store, layer, slot) if self.heads == "layer" else mass

    def keep(self, score: torch.Tensor, n: int, budget: int) -> torch.Tensor:
        """score (>= n,) of one head's n tokens -> the sorted storage indices it keeps."""
        if n <= budget:
            return torch.arange(n)
        s = neighbour_max(score[:n].float().clone(), self.pool)
        s[: self.sink] = float("inf")
        return torch.topk(s, budget).indices.sort().values

    def _evict(self, store, slot: int, layer: int, mass: torch.Tensor) -> None:
        budget = self._budget[slot]
        lens = list(store.lengths(layer, slot))
        sc = self.scores(store, layer, slot, mass)
        store.compact(layer, slot, [self.keep(sc[h], n, budget) for h, n in enumerate(lens)])

    def after_prefill(self, store, slot: int) -> None:
        self._budget[slot] = max(self.min_budget, int(self.ratio * store.seen[slot]))
        G = self.desc.n_heads // self.desc.n_kv_heads
        for layer in store.owned_layers():
            lens = store.lengths(layer, slot)
            st = store.stats.get(layer)
            if max(lens) <= self._budget[slot] or st is None or st.rows is None:
                continue
            rows = st.rows[:, -self.obs_window:]  # (H_q, w, L): the chunk's last queries, in storage order
            mass = rows.sum(1).view(self.desc.n_kv_heads, G, -1).sum(1)  # (H_kv, L)
            self._evict(store, slot, layer, mass)

    def decode_barrier(self, layer: int) -> bool:
        return False  # the hook scores and evicts this layer's own tokens only

    def after_decode_layer(self, ctx) -> None:
        if ctx.colsum is None or not ctx.store.owns(ctx.layer):
            return
        for b, slot in enumerate(ctx.slots):
            budget = self._budget.get(slot)
            if budget is not None and max(ctx.store.lengths(ctx.layer, slot)) >= budget + ctx.store.block_size:
                self._evict(ctx.store, slot, ctx.layer, ctx.colsum[b])

    def on_free(self, slot: int) -> None:
        self._budget.pop(slot, None)
