"""RazorAttention's data-free head calibration: echo and induction scores of every KV head.

The input is `n` random token ids repeated `repeats` times (after BOS). On the second and later copies a
query at token t can attend to earlier copies of t (echo) or to the token that followed them (induction).
A head's score is the attention mass it puts there, averaged over those queries; a KV head takes the max
over its group's query heads (the decision is per KV head: GQA K/V are never repeated).
Heads are picked globally over layers x KV heads: the top `echo_ratio` by echo score union the top
`induction_ratio` by induction score, by index (Golden-Stick's value membership over-selects on ties).
"""

from __future__ import annotations

import math
import sys

import torch


PAPER_TOKEN_RANGE = (10000, 12500)  # the reference implementation draws ids from here


def random_repeats(vocab: int, n: int, repeats: int, seed: int, bos: int | None) -> torch.Tensor:
    """(1 + n x repeats,) ids, deterministic for `seed`."""
    lo = min(PAPER_TOKEN_RANGE[0], vocab // 4)
    hi = min(lo + PAPER_TOKEN_RANGE[1] - PAPER_TOKEN_RANGE[0], vocab)
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(lo, hi, (n,), generator=g).repeat(repeats)
    return seq if bos is None else torch.cat([torch.tensor([bos]), seq])


def pattern_masks(n: int, repeats: int, offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(S, S) bool echo and induction masks over query i, key j, and the (S,) rows that count."""
    S = offset + n * repeats
    i = torch.arange(S).view(-1, 1)
    j = torch.arange(S).view(1, -1)
    real = (i >= offset) & (j >= offset)
    back = i - j  # distance from query to key
    echo = real & (back > 0) & (back % n == 0)
    induction = real & (back > 0) & ((back + 1) % n == 0) & (j > offset)  # key = the token after a copy
    rows = (torch.arange(S) >= offset + n)  # second copy onwards
    return echo, induction, rows


@torch.no_grad()
def score_heads(probe, n: int = 256, repeats: int = 4, seed: int = 2025) -> dict:
    """-> {"echo": [[score per kv head] per layer], "induction": [...]} of the probe's model."""
    from tqdm import tqdm

    d = probe.desc
    ids = random_repeats(d.vocab, n, repeats, seed, probe.tokenizer.bos_token_id).to(d.device)
    echo_m, ind_m, rows_m = (m.to(d.device) for m in pattern_masks(n, repeats, ids.numel() - n * repeats))
    group = d.n_heads // d.n_kv_heads
    echo, induction = [], []
    T = ids.numel()
    with tqdm(total=d.n_layers, desc="razor: scoring heads", unit="layer", file=sys.stderr) as bar:

        def trace(layer, t):
            probs = t["rows"][:, :, :T][:, rows_m]  # (H_q, R, S): every query's attention
            for out, m in ((echo, echo_m), (induction, ind_m)):
                mass = (probs * m[rows_m]).sum(-1).mean(-1)  # (H_q,) attention mass on the pattern
                out.append(mass.view(-1, group).amax(-1).tolist())  # max over each KV group
            bar.update(1)

        probe.run(ids, rows=T, trace=trace)
    return {"echo": echo, "induction": induction}


def retrieval_heads(scores: dict, echo_ratio: float, induction_ratio: float) -> list[list[int]]:
    """Per layer, the KV heads that keep a full cache."""
    echo, ind = torch.tensor(scores["echo"]), torch.tensor(scores["induction"])  # (L, H_kv)
    L, H = echo.shape
    picked = set()
    for s, ratio in ((echo, echo_ratio), (ind, induction_ratio)):
        k = min(math.ceil(ratio * L * H), L * H) if ratio > 0 else 0
        picked.update(torch.topk(s.flatten(), k).indices.tolist())
    return [[h for h in range(H) if l * H + h in picked] for l in range(L)]
