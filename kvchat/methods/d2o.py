"""d2o: D2O, dynamic discriminative operations on the KV cache (https://arxiv.org/abs/2406.13035).

Layer level: each layer's attention density is the variance over keys of its column sums, min-max
normalised over query heads and averaged (sigma_l in [0, 1]). Budgets follow w = softmax(-sigma) over
layers: ratio_l = clamp(w_l x L x `ratio`, 0.01, 1), budget_l = max(ratio_l x N, `min_budget`) tokens,
so a 30-token prompt still keeps a usable cache. Layers 0, 1 and L-1 are never compressed (paper).
Token level: a token's score is the attention it has received: at prefill the column sums of the last
`obs_window` queries' rows (the engine computes those rows only; full column sums would credit early
tokens for merely being seen by more queries), then each decode step's column sums. `heads: kv` scores
per KV head (summed over the group's query heads; K/V are never repeated) and each KV head keeps its own
tokens; `heads: layer` sums over every query head and the layer's heads keep one token set (when they
hold the same tokens: another per-head policy may have made them differ, then each keeps its own).
Scores are max-pooled over `pool` neighbouring tokens (1 = off). Each head keeps the first `sink`
tokens, the top-scoring (1 - `recent_share`) of the budget among older tokens and the last
`recent_share` of it.

Deviations, chosen on the tuning seeds of benchmarks/bench_quality.py (issue 15): the official code
evicts per query head on repeated K/V (9 heads for SmolLM2's 3 KV heads: 3x the memory). Per KV head
found 10/48 at 33% held (full 40/48); `heads: layer` with `pool: 7` 32/48 at the same share (a guess at why: in
each KV group the heads that do not read the key outvote the one that does, and a 5-digit key is 5
tokens that per-token top-k splits; SnapKV's pooling keeps them whole). `merge: false` drops instead of
merging; `edges: false` compresses layers 0, 1 and L-1 too; `dynamic: false` gives every layer `ratio`.

Evicted tokens merge into their most similar kept key when that cosine similarity u passes the
threshold tau (EMA over evictions: tau <- (1 - `tau_ema`) tau + `tau_ema` mean max-similarity, first tau
= the mean), weighted per kept token c as in Eq. 11-12: k_c <- (e k_c + sum_e exp(u_ec) k_e) /
(e + sum_e exp(u_ec)), values alike. Decode evicts at once what piled up when a layer reaches
budget + max(block_size, `slack` x budget) tokens, so compaction is amortized (an eviction costs the
same ~fifty small tensor ops whether it drops 16 tokens or 150) and held bytes stay within that of the
budget; a layer's slack follows its budget, so layers evict at different steps.

Multi-turn: a new turn is appended on top, every stored token (earlier turns included) is re-scored by
the new turn's last queries, budgets are recomputed from the tokens seen so far, and each layer evicts
and merges back down to its budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvchat_kernels import cpu
from kvchat_kernels.store_ops import index_rows
from kvchat.cache.format import Merge, Tokens
from kvchat.methods.base import Method, PrefillCtx, neighbour_max, same_tokens


def density(rows: torch.Tensor, n: int) -> float:
    """rows (H_q, w, L) -> sigma in [0, 1]: variance over the first n keys of the column sums, min-max
    normalised over heads, head mean."""
    var = rows[:, :, :n].sum(1).float().var(-1)  # (H_q,)
    span = var.max() - var.min()
    return float(((var - var.min()) / span).mean()) if span > 0 else 0.0


def layer_budgets(sigma: list[float], n_tokens: int, ratio: float, min_budget: int, edges: bool = True,
                  dynamic: bool = True) -> list[int | None]:
    """Tokens each layer keeps (None = uncompressed: layers 0, 1 and L-1 when `edges`); `dynamic`
    spreads them by density, otherwise every layer keeps `ratio`."""
    L = len(sigma)
    w = torch.softmax(-torch.tensor(sigma), 0) if dynamic else torch.full((L,), 1.0 / L)
    ratios = (w * L * ratio).clamp(0.01, 1.0).tolist()
    return [None if edges and l in (0, 1, L - 1) else max(int(r * n_tokens), min_budget)
            for l, r in enumerate(ratios)]


def max_similarity(ev_k, kept_k) -> tuple[torch.Tensor, torch.Tensor]:
    """Each evicted key's highest cosine similarity with a kept key, and that key's index: ev_k (..., E, D),
    kept_k (..., C, D) -> (..., E) twice (leading dims: heads evicted together). On the CPU one native call
    (kernels/cpu_similar.c: no (E, C) matrix; 3-10x torch's on bfloat16 keys), else its torch reference."""
    if cpu.max_cosine_ok(ev_k, kept_k):
        return cpu.max_cosine(ev_k, kept_k)
    return cpu.max_cosine_ref(ev_k, kept_k)


def merge_rows(kept_k, kept_v, ev_k, ev_v, tau: float, sim=None):
    """Paper Eq. 11-12, computed for the kept tokens that change only: each evicted token joins its most
    similar kept key if the similarity u >= tau.

    kept_* (..., C, D), ev_* (..., E, D) -> (rows (R,) indices into the flattened (..., C) kept tokens that
    something merged into, their new keys and values (R, D)); `sim` = max_similarity(ev_k, kept_k) when
    the caller has it already. Weights are normalised per kept token: w_c = e / (e + S_c),
    w_e = exp(u_ec) / (e + S_c), S_c = sum of exp(u) over the tokens merging into c (e = exp(1), a key's
    similarity with itself).
    """
    best, to = max_similarity(ev_k, kept_k) if sim is None else sim
    C, D = kept_k.shape[-2:]
    lead = torch.arange(best.numel() // max(best.shape[-1], 1), device=best.device).view(*best.shape[:-1], 1)
    src = (best >= tau).view(-1).nonzero().squeeze(1)  # flat evicted tokens that merge
    rows, into = torch.unique((to + C * lead).view(-1)[src], return_inverse=True)
    wt = torch.exp(best.view(-1)[src])
    denom = torch.full((rows.numel(),), math.e).index_add_(0, into, wt).unsqueeze(-1)
    out = []
    for kept, ev in ((kept_k, ev_k), (kept_v, ev_v)):
        num = math.e * kept.reshape(-1, D)[rows].float()
        num.index_add_(0, into, wt.unsqueeze(-1) * ev.reshape(-1, D)[src].float())
        out.append((num / denom).to(kept.dtype))
    return rows, out[0], out[1]


def merge(kept_k, kept_v, ev_k, ev_v, tau: float, sim=None):
    """`merge_rows` applied: -> merged kept keys and values (..., C, D) (tokens nothing merged into are
    unchanged), and each evicted token's max similarity (..., E)."""
    sim = max_similarity(ev_k, kept_k) if sim is None else sim
    rows, k, v = merge_rows(kept_k, kept_v, ev_k, ev_v, tau, sim)
    out = []
    for kept, new in ((kept_k, k), (kept_v, v)):
        kept = kept.clone()
        kept.view(-1, kept.shape[-1])[rows] = new
        out.append(kept)
    return out[0], out[1], sim[0]


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (g, n, D), idx (g, m) -> (g, m, D): each head's rows idx (one row copy, no expanded gather)."""
    g, n, D = x.shape
    flat = (idx + n * torch.arange(g, device=idx.device).view(-1, 1)).view(-1)
    return index_rows(x.reshape(g * n, D), flat).view(g, idx.shape[1], D)


@dataclass
class _SlotState:
    budgets: list = field(default_factory=list)  # per layer: tokens kept, None = uncompressed
    n: list = field(default_factory=list)  # per layer: tokens scored per head (follows the store's lengths), None = not scored
    sigma: list = field(default_factory=list)  # per layer density of the last prefill chunk
    tau: list = field(default_factory=list)  # per layer merge threshold, None until the first eviction
    limit: list = field(default_factory=list)  # per layer the length at which decode evicts, None = never


@dataclass
class D2O(Method):
    name = "d2o"
    ratio: float = 0.25
    recent_share: float = 0.2
    min_budget: int = 128
    sink: int = 4
    obs_window: int = 16
    tau_ema: float = 0.5
    merge: bool = True
    edges: bool = True
    dynamic: bool = True
    pool: int = 1
    heads: str = "kv"
    slack: float = 0.125

    def __post_init__(self):
        self._float("ratio", lo=0.0, hi=1.0, lo_open=True)
        self._float("recent_share", lo=0.0, hi=1.0)
        self._int("min_budget", lo=1)
        self._int("sink", lo=0)
        self._int("obs_window", lo=1)
        self._float("tau_ema", lo=0.0, hi=1.0)
        self._float("slack", lo=0.0, hi=1.0)
        for key in ("merge", "edges", "dynamic"):
            if not isinstance(getattr(self, key), bool):
                raise self._err(key, "must be true or false", getattr(self, key))
        self._pool()
        if self.heads not in ("kv", "layer"):
            raise self._err("heads", "must be kv or layer", self.heads)
        self._slots: dict[int, _SlotState] = {}
        # Per layer, every slot's accumulated attention in one buffer (n_slots, H_kv, cap), 0 past each head's
        # length: a decode step adds the step's column sums for all its slots in one op.
        self._scores: dict[int, torch.Tensor] = {}
        self._due: dict[int, set[int]] = {}  # layer -> slots whose append reached the limit (`on_append`)

    @classmethod
    def keep_all(cls) -> "D2O":
        return cls(min_budget=10**9)  # every layer's budget exceeds any prompt: nothing is evicted

    def pinned(self) -> int:
        return self.sink

    # ---- prefill -----------------------------------------------------------------------------------
    def prefill_rows(self, layer: int) -> int:
        return self.obs_window

    def after_prefill_layer(self, ctx: PrefillCtx):
        L = self.desc.n_layers
        if ctx.layer == 0 and (not any(ctx.chunk_start) or ctx.slot not in self._slots):
            self._slots[ctx.slot] = _SlotState([None] * L, [None] * L, [0.0] * L, [None] * L, [None] * L)
        state = self._slots[ctx.slot]
        lens = list(ctx.store.lengths(ctx.layer, ctx.slot))
        n = max(lens)
        rows = ctx.last_rows(self.obs_window)  # its own window, whatever other methods asked for
        state.sigma[ctx.layer] = density(rows, n)  # a layer sharing another's store still shapes the budgets
        if not ctx.store.owns(ctx.layer):
            return None
        G = self.desc.n_heads // self.desc.n_kv_heads
        # Re-scored by this chunk's last queries: earlier turns compete with the new one on equal terms.
        row = self._row(ctx.layer, ctx.slot, n, ctx.store.n_slots)
        row.zero_()[:, :n] = rows[:, :, :n].sum(1).view(-1, G, n).sum(1).float()  # (H_kv, n)
        state.n[ctx.layer] = lens
        return None

    def _row(self, layer: int, slot: int, top: int, n_slots: int | None = None) -> torch.Tensor:
        """(H_kv, cap) scores of (layer, slot), the layer's buffer grown to hold `top` tokens first (room
        for an eighth more, at least 32, so growth is rare)."""
        buf = self._scores.get(layer)
        if buf is None or top > buf.shape[2]:
            cap = top + max(32, top // 8)
            new = torch.zeros(n_slots or buf.shape[0], self.desc.n_kv_heads, cap)
            if buf is not None:
                new[:, :, : buf.shape[2]] = buf
            self._scores[layer] = buf = new
        return buf[slot]

    def after_prefill(self, store, slot: int) -> None:
        state = self._slots[slot]
        state.budgets = layer_budgets(state.sigma, store.seen[slot], self.ratio, self.min_budget, self.edges,
                                      self.dynamic)
        # Amortized: decode lets `slack` pile up, then evicts it in one compaction.
        state.limit = [None if b is None else b + max(store.block_size, int(self.slack * b)) for b in state.budgets]
        for layer, budget in enumerate(state.budgets):
            if budget is None:  # never compressed: no scores to keep up to date
                state.n[layer] = None
            elif store.owns(layer):
                self._evict(store, slot, layer, state, budget)

    # ---- decode ------------------------------------------------------------------------------------
    def decode_colsum(self, layer: int) -> bool:
        return not self.edges or 1 < layer < self.desc.n_layers - 1

    def decode_colsum_into(self, layer: int) -> torch.Tensor | None:
        # Every slot's accumulated attention: the engine adds the step's sums in (the kernel, mostly). A row of a
        # slot that keeps no scores for this layer gains sums nobody reads: a prefill zeroes a row before scoring.
        return self._scores.get(layer) if self.decode_colsum(layer) else None

    def on_append(self, layer: int, slots, n: int) -> None:
        top = 0  # every layer, every decode step: host arithmetic, the buffer touched only to grow it
        for slot in slots:
            state = self._slots.get(slot)
            if state is not None and state.n[layer] is not None:
                lens = state.n[layer] = [k + n for k in state.n[layer]]
                most = max(lens)
                top = max(top, most)
                limit = state.limit[layer]
                if limit is not None and most >= limit:  # `after_decode_layer` evicts it
                    self._due.setdefault(layer, set()).add(slot)
        if top and top > self._scores[layer].shape[2]:  # scored slots made the buffer at prefill
            self._row(layer, slots[0], top)  # grown for every slot; new tokens start at 0

    def decode_barrier(self, layer: int) -> bool:
        return False  # the hook scores and evicts this layer's own tokens only

    def after_decode_layer(self, ctx) -> None:
        layer = ctx.layer
        due = self._due.pop(layer, None)  # most steps: no slot reached its limit on this layer
        if due is None or not self.decode_colsum(layer) or not ctx.store.owns(layer):
            return
        # The step's column sums are in the scores already (`decode_colsum_into`).
        for slot in ctx.slots:
            state = self._slots.get(slot)
            if slot not in due or state is None or state.n[layer] is None:
                continue
            if max(state.n[layer]) >= state.limit[layer]:  # a prefill's append may have put it here: asked again
                self._evict(ctx.store, slot, layer, state, state.budgets[layer])

    # ---- per-token state follows every compaction --------------------------------------------------
    def on_compact(self, layer, slot, keep, before) -> None:
        state = self._slots.get(slot)
        if state is None or state.n[layer] is None:
            return
        row, sizes = self._row(layer, slot, 0), [int(k.numel()) for k in keep]
        top = max(sizes)
        if min(sizes) == top:
            kept = row.gather(1, torch.stack(keep))
        else:
            kept = torch.zeros(row.shape[0], top)
            for h, idx in enumerate(keep):
                kept[h, : idx.numel()] = row[h, idx]
        row.zero_()[:, :top] = kept  # 0 past each head
        state.n[layer] = sizes

    def on_free(self, slot: int) -> None:
        self._slots.pop(slot, None)
        for due in self._due.values():
            due.discard(slot)

    def state_lengths(self, layer: int, slot: int) -> list[int] | None:
        state = self._slots.get(slot)
        return None if state is None or state.n[layer] is None else list(state.n[layer])

    # ---- eviction ----------------------------------------------------------------------------------
    def keep_mask(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        """scores (n,) -> (n,) bool, True where a token stays: sinks, the top scorers among old tokens, the
        recent ones."""
        n = scores.shape[0]
        rec = min(int(budget * self.recent_share), n)
        hh = max(budget - rec, 0)
        old = scores[: n - rec].float()
        old = neighbour_max(old, self.pool) if self.pool > 1 else old.clone()  # a copy: the sinks are set in it
        old[: self.sink] = float("inf")
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.topk(old, min(hh, old.shape[0])).indices] = True
        mask[n - rec :] = True
        return mask

    def keep_indices(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        """scores (n,) -> sorted kept indices (`keep_mask`'s)."""
        return self.keep_mask(scores, budget).nonzero().squeeze(1)

    def _keeps(self, scores: torch.Tensor, lens: list[int], budget: int, same: bool) -> list[torch.Tensor]:
        """Sorted kept indices per KV head; `heads: layer` scores once for the layer when its heads hold
        the same tokens (`same`; then every head keeps the same set)."""
        if self.heads == "layer" and same:
            return [self.keep_indices(scores[:, : lens[0]].sum(0), budget)] * len(lens)
        return [self.keep_indices(scores[h, :n], budget) if n > budget else torch.arange(n)
                for h, n in enumerate(lens)]

    def _evict(self, store, slot: int, layer: int, state: _SlotState, budget: int) -> None:
        lens = list(store.lengths(layer, slot))
        if max(lens) <= budget:
            return
        if self.merge and min(lens) == max(lens) and store.native_evict(layer):
            self._evict_native(store, slot, layer, state, budget, lens)
            return
        # Heads of equal length (the usual case) come in one read; their positions tell whether they hold
        # the same tokens.
        both = store.read_heads(layer, slot) if self.merge else None
        if both is not None:
            same = bool((both.pos == both.pos[:1]).all())
        else:
            same = self.heads == "layer" and same_tokens(store, layer, slot)
        keeps = self._keeps(self._row(layer, slot, 0), lens, budget, same)
        if not self.merge:
            store.compact(layer, slot, keeps)
            return
        # Heads that lose tokens, grouped by length: a group's similarities and merges run as one batch.
        groups: dict[int, list[int]] = {}
        for h, (n, keep) in enumerate(zip(lens, keeps)):
            if keep.numel() < n:
                groups.setdefault(n, []).append(h)
        plans = []
        for n, heads in groups.items():
            if both is not None and len(heads) == len(lens):
                toks = both
            else:
                toks = Tokens(*(None if x[0] is None else torch.stack(x)
                                for x in zip(*(store.read(layer, slot, h) for h in heads))))
            keep = torch.stack([keeps[h] for h in heads])  # (g, C)
            gone = torch.ones(len(heads), n, dtype=torch.bool).scatter_(1, keep, False)
            gone = gone.nonzero()[:, 1].view(len(heads), -1)  # (g, E), sorted
            kept_k, ev_k = _rows(toks.k, keep), _rows(toks.k, gone)
            plans.append((heads, toks, keep, kept_k, ev_k, gone, max_similarity(ev_k, kept_k)))
        # One threshold per layer (paper Eq. 10), from this eviction's head-mean max similarity.
        sim = torch.cat([p[-1][0].mean(-1) for p in plans]).mean().item()
        tau = state.tau[layer]
        state.tau[layer] = tau = sim if tau is None else (1 - self.tau_ema) * tau + self.tau_ema * sim
        store.compact(layer, slot, keeps)  # scores and other methods follow; kept token j is now at j
        for heads, toks, keep, kept_k, ev_k, gone, sim in plans:
            # Rewrite only the kept tokens something merged into, every head's in one write.
            rows, k_new, v_new = merge_rows(kept_k, _rows(toks.v, keep), ev_k, _rows(toks.v, gone), tau, sim)
            if rows.numel():
                C = keep.shape[1]
                head, idx = rows // C, rows % C
                src = keep.view(-1)[rows]
                bias = None if toks.bias is None else toks.bias[head, src]
                store.write_many(layer, slot, torch.tensor(heads)[head], idx,
                                 Tokens(k_new, v_new, toks.pos[head, src], bias))

    def _evict_native(self, store, slot: int, layer: int, state: _SlotState, budget: int, lens: list[int]) -> None:
        """`_evict` of heads of one length n > budget on a store that evicts natively (kernels/cpu_evict.c):
        the similarities in one call, the merges and the compaction in another, in place. The same tokens,
        threshold and bytes as the torch path above (tests/test_d2o_native.py), without its copies of the
        layer: every head keeps `budget` tokens and drops n - budget."""
        H, n, row = len(lens), lens[0], self._row(layer, slot, 0)
        if self.heads == "layer" and same_tokens(store, layer, slot):
            mask = self.keep_mask(row[:, :n].sum(0), budget).expand(H, n)  # every head keeps one set
        else:
            mask = torch.stack([self.keep_mask(row[h, :n], budget) for h in range(H)])
        keep, gone = mask.nonzero()[:, 1].view(H, -1), (~mask).nonzero()[:, 1].view(H, -1)  # (H, C), (H, E) sorted
        best, into = store.similar(layer, slot, keep, gone)
        sim = best.mean(-1).mean().item()
        tau = state.tau[layer]
        state.tau[layer] = tau = sim if tau is None else (1 - self.tau_ema) * tau + self.tau_ema * sim
        # The weights exp(u) of the tokens that merge (u >= tau), 0 for the others: elementwise, so the same
        # values as the torch path's exp of the merging tokens alone, in two ops.
        w = best.exp().masked_fill_(best < tau, 0.0)
        store.compact(layer, slot, list(keep), Merge(gone, into, w, math.e))
