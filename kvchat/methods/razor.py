"""razor: RazorAttention, full caches for retrieval heads only (https://arxiv.org/abs/2407.15891).

A data-free calibration (kvchat/calibration/razor.py, cached per model under KVCHAT_HOME, run on first
use) scores every KV head for echo and induction attention on a repeated random-token sequence; the top
`echo_ratio` + `induction_ratio` of layers x KV heads are retrieval heads and keep every token. Every
other KV head keeps the first `sink` tokens, the most recent W = max(`recent`, `window_ratio` x N) tokens
(N = tokens seen at the last prefill) and ONE compensation token: the mean of the keys and values it
dropped (Eq. 4), whose logit carries ln(count) through the store's bias pool so it weighs as much as the
tokens it stands for (Eq. 5). Tokens leaving the window fold into it as a running mean. Lengths are
physical per head: a non-retrieval head holds sink + 1 + W tokens whatever the prompt length.
Deviation: `echo_ratio` defaults to 5% of heads (the paper protects 1% echo + 14% induction heads). On
SmolLM2-135M with 1% echo heads the 6-depth needle of benchmarks/bench_methods.py found 4/6 (and 4-5/6
with 15-25% induction heads); 5% echo + 14% induction finds 6/6 at 32% held on 1.2k-2k-token prompts.
Storage order of a folded head: [sinks][compensation][window]. During decode a head folds what piled
up once max(block_size, `slack` x W) tokens are past its window (amortized: a fold costs the same few
dozen tensor ops whether it folds 16 tokens or 64), so it holds at most W + that + sink + 1 tokens.

Multi-turn: a new turn is appended on top; at its end W is recomputed from the tokens seen so far and
every non-retrieval head folds the earlier turns' tokens that fell out of the window into the same
compensation token; retrieval heads keep all turns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvchat.cache.format import Merge, Tokens
from kvchat.calibration.cache import cache_path, read_json, write_json
from kvchat.calibration.razor import retrieval_heads, score_heads
from kvchat.errors import KvchatError
from kvchat.methods.base import Method


@dataclass
class RazorAttention(Method):
    name = "razor"
    sink: int = 4
    recent: int = 128
    window_ratio: float = 0.125
    echo_ratio: float = 0.05
    induction_ratio: float = 0.14
    calib_tokens: int = 256
    calib_repeats: int = 4
    calib_seed: int = 2025
    compensation: bool = True
    slack: float = 0.125

    def __post_init__(self):
        self._int("sink", lo=0)
        self._int("recent", lo=1)
        self._float("window_ratio", lo=0.0, hi=1.0)
        self._float("echo_ratio", lo=0.0, hi=1.0)
        self._float("induction_ratio", lo=0.0, hi=1.0)
        self._int("calib_tokens", lo=8)
        self._int("calib_repeats", lo=2)
        self._int("calib_seed", lo=0)
        self._float("slack", lo=0.0, hi=1.0)
        if not isinstance(self.compensation, bool):
            raise self._err("compensation", "must be true or false", self.compensation)
        self._window: dict[int, int] = {}  # slot -> W
        self._count: dict[int, torch.Tensor] = {}  # slot -> (L, H_kv) tokens folded into the comp token
        self._comp: dict[int, list[list[int]]] = {}  # slot -> [layer][head] storage index of the comp token, -1 none
        self._wait: dict[int, list[int]] = {}  # slot -> [layer] decode steps before a head can pass its fold limit

    # ---- calibration -------------------------------------------------------------------------------
    def calib_params(self) -> dict:
        return {"tokens": self.calib_tokens, "repeats": self.calib_repeats, "seed": self.calib_seed, "version": 1}

    def calibrate(self, probe, force: bool = False):
        """Scores of every KV head of the probe's model, computed once and cached; -> the cache file."""
        path = cache_path(probe.model_name, "razor", self.calib_params())
        if force or read_json(path) is None:
            probe.progress(f"razor: calibrating retrieval heads of {probe.model_name} once (cached in {path})")
            scores = score_heads(probe, self.calib_tokens, self.calib_repeats, self.calib_seed)
            write_json(path, {"model": probe.model_name, "params": self.calib_params(), **scores})
        return path

    def bind(self, desc, probe=None) -> None:
        super().bind(desc, probe)
        data = read_json(cache_path(desc.name, "razor", self.calib_params()))
        if data is None:
            if probe is None:
                raise KvchatError(f"razor needs a calibration of {desc.name}; run `kvchat calibrate -p razor`")
            data = read_json(self.calibrate(probe))
        self.heads = retrieval_heads(data, self.echo_ratio, self.induction_ratio)
        self._retrieval = torch.zeros(desc.n_layers, desc.n_kv_heads, dtype=torch.bool)
        for layer, hs in enumerate(self.heads):
            self._retrieval[layer, hs] = True
        self._folding = [not bool(self._retrieval[l].all()) for l in range(desc.n_layers)]
        self._is_retrieval = self._retrieval.tolist()  # [layer][head], read every decode step

    def needs_bias(self) -> bool:
        return self.compensation

    @classmethod
    def keep_all(cls) -> "RazorAttention":
        return cls(echo_ratio=1.0)  # every head is a retrieval head

    def pinned(self) -> int:
        return self.sink + 1  # the sinks and the compensation token stay full precision under a tail format

    # ---- eviction ----------------------------------------------------------------------------------
    def after_prefill_layer(self, ctx):
        if ctx.layer == 0 and not any(ctx.chunk_start):  # a new sequence in this slot: no comp tokens yet
            L, H = self.desc.n_layers, self.desc.n_kv_heads
            self._count[ctx.slot] = torch.zeros(L, H)
            self._comp[ctx.slot] = [[-1] * H for _ in range(L)]
        return None

    def after_prefill(self, store, slot: int) -> None:
        self._window[slot] = max(self.recent, int(self.window_ratio * store.seen[slot]))
        self._wait[slot] = [0] * self.desc.n_layers  # the next decode step checks every layer
        self._fold_all(store, [slot], decode=False)

    def after_decode(self, store, slots) -> None:
        # A head folds once `slack` has piled up past its window: one compaction for all of it.
        self._fold_all(store, slots, decode=True)

    def on_compact(self, layer, slot, keep, before) -> None:
        comps = self._comp.get(slot)
        if comps is None:
            return
        for h, c in enumerate(comps[layer]):
            if c >= 0:  # where the compensation token went, or gone (another policy evicted it)
                hit = (keep[h] == c).nonzero()
                comps[layer][h] = int(hit[0, 0]) if hit.numel() else -1
                if not hit.numel():
                    self._count[slot][layer, h] = 0

    def on_free(self, slot: int) -> None:
        for d in (self._window, self._count, self._comp, self._wait):
            d.pop(slot, None)

    def _fold_all(self, store, slots, decode: bool) -> None:
        """Fold every (layer, slot) whose non-retrieval heads passed their limit. In decode a head grows by
        at most one token a step, so a layer whose longest such head is m tokens under the limit is not
        looked at again for m steps (`_wait`): the same folds at the same steps, without reading every
        layer's lengths every step."""
        for layer in store.owned_layers():
            if not self._folding[layer]:
                continue
            retrieval = self._is_retrieval[layer]
            for slot in slots:
                W = self._window.get(slot)
                if W is None:
                    continue
                wait = self._wait[slot]
                if decode and wait[layer] > 0:
                    wait[layer] -= 1
                    continue
                limit = self.sink + 1 + W + (max(store.block_size, int(self.slack * W)) if decode else 0)
                if any(n > limit and not r for n, r in zip(store.lengths(layer, slot), retrieval)):
                    self._fold(store, slot, layer)
                if decode:
                    longest = max(n for n, r in zip(store.lengths(layer, slot), retrieval) if not r)
                    wait[layer] = limit - longest

    def _fold(self, store, slot: int, layer: int) -> None:
        """Move each non-retrieval head's tokens older than the window into its compensation token.
        Storage order of a folded head: [sinks][compensation][window]."""
        W, count, comps = self._window[slot], self._count[slot][layer], self._comp[slot][layer]
        lens = list(store.lengths(layer, slot))
        keeps, folds = [], []  # folds: (head, its comp token or -1, first dropped index, tokens dropped)
        for h, n in enumerate(lens):
            c = comps[h]
            base = c + 1 if c >= 0 else min(self.sink, n)  # first token that is neither sink nor compensation
            drop = n - W - base
            if self._is_retrieval[layer][h] or drop <= 0:
                keeps.append(torch.arange(n))
                continue
            if not self.compensation:  # sinks and the window only: the dropped tokens are gone
                keeps.append(torch.cat([torch.arange(base), torch.arange(n - W, n)]))
                continue
            folds.append((h, c, base, drop))
            head = base if c >= 0 else base + 1  # the comp token, or the first dropped token as its placeholder
            keeps.append(torch.cat([torch.arange(head), torch.arange(n - W, n)]))
        if folds and store.native_evict(layer) and len({int(keeps[h].numel()) for h, *_ in folds}) == 1:
            self._fold_native(store, slot, layer, lens, keeps, folds)
            return
        new = self._compensation(store, layer, slot, folds, count) if folds else None
        for h, _, _, drop in folds:
            count[h] += drop
        store.compact(layer, slot, keeps)
        if folds:  # each compensation token sits right after its head's sinks; all heads in one write
            heads = [h for h, *_ in folds]
            for h in heads:
                comps[h] = int(keeps[h].numel() - min(W, lens[h]) - 1)
            store.write_many(layer, slot, torch.tensor(heads), torch.tensor([comps[h] for h in heads]), new)

    def _fold_native(self, store, slot: int, layer: int, lens: list[int], keeps: list[torch.Tensor], folds) -> None:
        """`_fold` on a store that merges in place (kernels/cpu_evict.c), the folded heads keeping the same
        number of tokens: each head's dropped tokens merge into its compensation token (weighing the count
        it stands for) or, on a first fold, into the first dropped token kept as its placeholder, as the
        compaction moves the window down. The same bytes as `_compensation` and the write after the
        compaction (tests/test_razor_native.py), without reading the dropped tokens out and back."""
        W, count, comps = self._window[slot], self._count[slot][layer], self._comp[slot][layer]
        heads = [h for h, *_ in folds]
        at = [c if c >= 0 else base for _, c, base, _ in folds]  # the token each head's fold merges into
        first = [a + 1 for a in at]  # its first merging token
        E = max(lens[h] - W - f for h, f in zip(heads, first))
        gone = torch.zeros(len(folds), E, dtype=torch.int64)
        w = torch.zeros(len(folds), E)
        for i, (h, f) in enumerate(zip(heads, first)):
            m = lens[h] - W - f
            gone[i, :m] = torch.arange(f, f + m)
            w[i, :m] = 1.0
        n_old = [float(count[h]) if c >= 0 else 0.0 for h, c, *_ in folds]
        self_w = torch.tensor([n if c >= 0 else 1.0 for n, (_, c, *_) in zip(n_old, folds)])
        n_t = torch.tensor([n + drop for n, (*_, drop) in zip(n_old, folds)])
        # The merged token's position is its newest dropped token's, its logit bias ln(count) (Eq. 5).
        heads_t, at_t = torch.tensor(heads), torch.tensor(at)
        t = store.read_many(layer, slot, torch.cat([heads_t, heads_t]),
                            torch.cat([at_t, torch.tensor([lens[h] - W - 1 for h in heads])]))
        k = len(heads)
        store.write_many(layer, slot, heads_t, at_t, Tokens(t.k[:k], t.v[:k], t.pos[k:], torch.log(n_t).float()))
        store.compact(layer, slot, keeps, Merge(gone, at_t.view(-1, 1).expand(-1, E), w, self_w, heads))
        for h, a, (*_, drop) in zip(heads, at, folds):
            count[h] += drop
            comps[h] = a

    def _compensation(self, store, layer, slot, folds, count) -> Tokens:
        """The compensation token of each fold (head h, comp token c or -1, base, drop) after folding
        `drop` tokens from `base` on into the one at `c` (a running mean: the old token stands for the
        count[h] tokens folded before). All folds' tokens come in one read; -> Tokens (folds, ...)."""
        heads, idx, seg, wt, n = [], [], [], [], []
        for i, (h, c, base, drop) in enumerate(folds):
            n_old = float(count[h]) if c >= 0 else 0.0
            rows = [c] if n_old > 0 else []
            heads += [h] * (len(rows) + drop)
            idx += rows + list(range(base, base + drop))
            seg += [i] * (len(rows) + drop)
            wt += [n_old] * len(rows) + [1.0] * drop
            n.append(n_old + drop)
        t = store.read_many(layer, slot, torch.tensor(heads), torch.tensor(idx))
        seg_t, wt_t, n_t = torch.tensor(seg), torch.tensor(wt).unsqueeze(1), torch.tensor(n).unsqueeze(1)
        k, v = (torch.zeros(len(folds), x.shape[1]).index_add_(0, seg_t, x.float() * wt_t) / n_t for x in (t.k, t.v))
        last = torch.tensor(seg[1:] + [len(folds)]) != seg_t  # each fold's last row: its newest dropped token
        return Tokens(k.to(t.k.dtype), v.to(t.v.dtype), t.pos[last], torch.log(n_t.view(-1)).float())
