"""KVSharer's search (https://arxiv.org/abs/2410.18517): which layers read an earlier layer's KV cache.

1. Average each layer's K (after RoPE) and V over `n` windows of calibration text, position by
   position: K_bar[l] (T, H_kv, D).
2. Distance of a pair (i, j), i > j: D = (mean ||K_bar_i - K_bar_j|| + mean ||V_bar_i - V_bar_j||) / 2,
   the norm over head_dim, the mean over tokens and heads.
3. Pairs sorted by D, most DISSIMILAR first (the paper's finding: sharing dissimilar layers hurts less).
4. Greedy: for each pair (i, j) whose later layer i does not share yet, tentatively let i read j's
   cache (chains resolved: i reads j's own source, and layers reading i now read that source too); the
   share is accepted when the mean over the windows of cos(final hidden states with it, without it),
   each window's (T, hidden) flattened, stays above `threshold`. Stop once `layers` layers share.

The official notebook (test_llama.ipynb) sums past_key_values under a bare `try/except: pass`, which
skips every sample whose length differs from the first, yet divides by all of them. Here every window
has exactly `tokens` tokens and the mean divides by the windows actually summed.

The search only ever adds shares, and a decision depends on the shares accepted before it, so the map
for s layers is the first s accepted shares of a longer search (`share_map(accepted[:s])`).
"""

from __future__ import annotations

import sys

import torch


def resolve(share: dict[int, int], layer: int, src: int) -> dict[int, int]:
    """`share` plus `layer` reading `src`'s cache, with no chains: `layer` reads the layer `src` reads
    (if any), and layers that read `layer` move to that same source."""
    root = share.get(src, src)
    out = {l: (root if s == layer else s) for l, s in share.items()}
    out[layer] = root
    return out


def share_map(accepted: list[tuple[int, int]]) -> dict[int, int]:
    """The map after accepting the (layer, source) pairs in order."""
    share: dict[int, int] = {}
    for layer, src in accepted:
        share = resolve(share, layer, src)
    return share


@torch.no_grad()
def mean_kv(probe, windows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """-> K_bar, V_bar (L, T, H_kv, D): each layer's keys (after RoPE) and values averaged over the
    windows (all of length T), in float32; and each window's final hidden states (T, hidden) unshared."""
    L = probe.desc.n_layers
    k_sum: list[torch.Tensor | None] = [None] * L
    v_sum: list[torch.Tensor | None] = [None] * L

    def trace(layer, t):
        k, v = t["k"].float(), t["v"].float()
        k_sum[layer] = k if k_sum[layer] is None else k_sum[layer] + k
        v_sum[layer] = v if v_sum[layer] is None else v_sum[layer] + v

    hidden = [probe.run(ids, trace=trace) for ids in windows]
    n = len(windows)  # every window was summed: divide by what was used
    return torch.stack(k_sum) / n, torch.stack(v_sum) / n, hidden


def distances(k_bar: torch.Tensor, v_bar: torch.Tensor) -> torch.Tensor:
    """(L, L) D[i, j] for i > j (NaN elsewhere) from K_bar, V_bar (L, T, H, D)."""
    L = k_bar.shape[0]
    dist = torch.full((L, L), float("nan"))
    for i in range(L):
        for j in range(i):
            dk = (k_bar[i] - k_bar[j]).norm(dim=-1).mean()
            dv = (v_bar[i] - v_bar[j]).norm(dim=-1).mean()
            dist[i, j] = float((dk + dv) / 2)
    return dist


def ranked_pairs(dist: torch.Tensor) -> list[tuple[int, int]]:
    """(later, earlier) pairs, most dissimilar first; ties by layer index (deterministic)."""
    L = dist.shape[0]
    pairs = [(i, j) for i in range(L) for j in range(i)]
    return sorted(pairs, key=lambda p: (-float(dist[p]), p))


def similarity(probe, windows, reference: list[torch.Tensor], share: dict[int, int],
               threshold: float = -1.0) -> tuple[float, bool]:
    """Mean over windows of cos(final hidden states under `share`, the reference's), each flattened.
    -> (mean, complete). Stops early once even a cosine of 1 on every window left could not lift the
    mean above `threshold` (the share is rejected either way): then the mean is that upper bound."""
    n, total = len(windows), 0.0
    for i, (ids, ref) in enumerate(zip(windows, reference)):
        h = probe.run(ids, aliases=share)
        total += float(torch.nn.functional.cosine_similarity(h.flatten().float(), ref.flatten().float(), dim=0))
        bound = (total + (n - i - 1)) / n
        if i + 1 < n and bound <= threshold:
            return bound, False
    return total / n, True


@torch.no_grad()
def search(probe, windows: list[list[int]], layers: int, threshold: float) -> dict:
    """The greedy search on the probe's model. -> {"map": {layer: source}, "accepted": [[layer, source,
    similarity, pairs tried so far]...] in order, "tried": pairs evaluated, "similarity": of the final
    map, "distance": (L, L) as nested lists (None on and above the diagonal)}."""
    from tqdm import tqdm

    k_bar, v_bar, reference = mean_kv(probe, windows)
    dist = distances(k_bar, v_bar)
    share: dict[int, int] = {}
    accepted, tried, sim_now = [], 0, 1.0
    pairs = ranked_pairs(dist)
    with tqdm(total=layers, desc="kvsharer: layers shared", unit="layer", file=sys.stderr) as bar:
        for layer, src in pairs:
            if len(share) >= layers:
                break
            if layer in share:
                continue
            candidate = resolve(share, layer, src)
            tried += 1
            sim, _ = similarity(probe, windows, reference, candidate, threshold)
            bar.set_postfix(tried=tried, cos=f"{sim:.3f}")
            if sim > threshold:
                share, sim_now = candidate, sim
                accepted.append([layer, src, round(sim, 6), tried])
                bar.update(1)
    return {"map": {str(l): s for l, s in sorted(share.items())}, "accepted": accepted, "tried": tried,
            "similarity": round(sim_now, 6),
            "distance": [[None if j >= i else round(float(dist[i, j]), 5) for j in range(dist.shape[0])]
                         for i in range(dist.shape[0])]}


def first_shares(found: dict, s: int) -> dict:
    """`found` (a search for at least s layers) as the search for s layers would have returned it: a
    search only adds shares, each decided on the shares before it, so it is the first s accepted."""
    if s >= len(found["accepted"]):
        return found
    acc = found["accepted"][:s]
    share = share_map([(l, src) for l, src, *_ in acc])
    return {**found, "map": {str(l): src for l, src in sorted(share.items())}, "accepted": acc,
            "tried": acc[-1][3] if acc else 0, "similarity": acc[-1][2] if acc else 1.0}
