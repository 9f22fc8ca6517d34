"""CSKV's factors: per layer and KV head, a rank-r affine map of the pre-RoPE keys and of the values.

A token's feature is c = (x - mu) @ down (r,), its reconstruction x_hat = mu + c @ up (D,), for x its key
before RoPE or its value.

Closed form, no training. CSKV trains its factors on sum ||RoPE(k) - RoPE(k_hat)||^2 + ||v - v_hat||^2.
RoPE rotates each position's key, so the RoPE'd error is the pre-RoPE error, and the best rank-r affine
reconstruction of a set of vectors is their centred PCA (Eckart-Young): mu the mean, down = up^T the top r
eigenvectors of the covariance. methods.md's closed form (SVD of L^T W^T with X^T X = L L^T) spans the same
subspace: both minimize ||X W^T - X A B||, whose minimizer is the truncated SVD of X W^T, i.e. of the keys.
PCA needs only the first and second moments of k_pre and v per head, so those are what is cached
(`cskv-moments`, reused by every rank), and any (k_density, v_density) is an eigendecomposition away.

Refinement (`train_steps` > 0). The PCA is already the optimum of the paper's loss on this data, so
training on that loss would change nothing. `refine` keeps the paper's setting (layer-local, teacher
forced: each layer's true queries, keys and values from the probe, the model frozen, only the factors
train) but trains on what the layer computes with them: its attention output, with keys and values
older than the full-precision window reconstructed, relative squared error, Adam.
"""

from __future__ import annotations

import sys

import torch

MOMENTS = ("k_sum", "k_sq", "v_sum", "v_sq")


@torch.no_grad()
def moments(probe, seqs: list[list[int]]) -> dict:
    """First and second moments of each layer's pre-RoPE keys and values per KV head over `seqs`:
    k_sum (L, H, D), k_sq (L, H, D, D), v_sum, v_sq float64, n () tokens."""
    from tqdm import tqdm

    d = probe.desc
    L, H, D = d.n_layers, d.n_kv_heads, d.head_dim
    out = {n: torch.zeros(L, H, D, dtype=torch.float64) for n in ("k_sum", "v_sum")}
    out.update({n: torch.zeros(L, H, D, D, dtype=torch.float64) for n in ("k_sq", "v_sq")})

    def trace(layer, t):
        for name, x in (("k", t["k_pre"]), ("v", t["v"])):
            if x is None:  # a layer reading another's store: nothing of its own to compress
                continue
            x = x.detach().to("cpu", torch.float64).transpose(0, 1)  # (H, T, D)
            out[f"{name}_sum"][layer] += x.sum(1)
            out[f"{name}_sq"][layer] += x.transpose(1, 2) @ x

    n = 0
    for ids in tqdm(seqs, desc="cskv: key/value statistics", unit="sample", file=sys.stderr):
        probe.run(torch.tensor(ids), trace=trace)
        n += len(ids)
    out["n"] = torch.tensor(float(n), dtype=torch.float64)
    return out


def pca(s: torch.Tensor, sq: torch.Tensor, n: float, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments s (..., D), sq (..., D, D) of n vectors -> mean (..., D), top-r principal directions (..., D, r),
    float32. r = D gives the identity (exact, and no eigenvector noise for what is not compressed)."""
    D = s.shape[-1]
    if r >= D:
        return torch.zeros(s.shape, dtype=torch.float32), torch.eye(D).expand(*s.shape[:-1], D, D).clone()
    mu = s / n
    cov = sq / n - mu.unsqueeze(-1) * mu.unsqueeze(-2)
    _, vec = torch.linalg.eigh(cov)  # ascending eigenvalues
    P = vec[..., -r:].flip(-1)
    # eigh's sign per vector is arbitrary: fix it so a cached and a fresh run store the same features
    sign = torch.where(P.gather(-2, P.abs().argmax(-2, keepdim=True)) < 0, -1.0, 1.0)
    return mu.float(), (P * sign).float()


def pca_factors(mom: dict, k_rank: int, v_rank: int) -> dict:
    """-> {k,v}_{mu (L, H, D), down (L, H, D, r), up (L, H, r, D)} float32 from `moments`."""
    out = {}
    for name, r in (("k", k_rank), ("v", v_rank)):
        mu, P = pca(mom[f"{name}_sum"], mom[f"{name}_sq"], float(mom["n"]), r)
        out.update({f"{name}_mu": mu, f"{name}_down": P.contiguous(), f"{name}_up": P.transpose(-1, -2).contiguous()})
    return out


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def attention_error(f: dict, q, k_pre, v, cos, sin, window: int) -> torch.Tensor:
    """Relative squared error of one layer's attention output when keys and values more than `window`
    tokens older than the query are reconstructed from features. q (Q, H_q, D) the last Q queries (after
    RoPE), k_pre / v (T, H, D), cos / sin (T, 1, D); f holds the layer's factors (H, ...)."""
    T, H, D = k_pre.shape
    Q, G = q.shape[0], q.shape[1] // H

    def rec(x, name):
        c = torch.einsum("thd,hdr->thr", x - f[f"{name}_mu"], f[f"{name}_down"])
        return f[f"{name}_mu"] + torch.einsum("thr,hrd->thd", c, f[f"{name}_up"])

    k, k_hat = _rope(k_pre, cos, sin), _rope(rec(k_pre, "k"), cos, sin)
    v_hat = rec(v, "v")
    qg = q.view(Q, H, G, D).permute(1, 2, 0, 3).reshape(H, G * Q, D)  # rows: (group member, query)
    t = torch.arange(T - Q, T, device=q.device).repeat(G).view(1, G * Q, 1)
    s = torch.arange(T, device=q.device).view(1, 1, T)
    old = s <= t - window  # (1, G*Q, T): what a decode step at t reads from features
    scores = lambda keys: torch.matmul(qg, keys.permute(1, 2, 0)) * D**-0.5  # noqa: E731  (H, G*Q, T)
    exact = scores(k).masked_fill(s > t, float("-inf"))
    p = torch.softmax(exact, -1)
    o = torch.matmul(p, v.transpose(0, 1))
    p_hat = torch.softmax(torch.where(old, scores(k_hat), exact), -1)
    o_hat = torch.matmul(p_hat * old, v_hat.transpose(0, 1)) + torch.matmul(p_hat * ~old, v.transpose(0, 1))
    return ((o_hat - o) ** 2).sum() / (o**2).sum()


def refine(probe, fac: dict, seqs: list[list[int]], steps: int, lr: float, window: int, queries: int) -> dict:
    """`steps` Adam steps per layer on `attention_error` over `seqs` (every sample each step), starting
    from `fac`; -> refined factors (same keys and shapes)."""
    from tqdm import tqdm

    d = probe.desc
    per_layer: dict[int, list] = {}

    def trace(layer, t):
        if t["k_pre"] is not None:
            grab = lambda x: x.detach().to("cpu", torch.float32)  # noqa: E731
            per_layer.setdefault(layer, []).append((grab(t["q"][-queries:]), grab(t["k_pre"]), grab(t["v"])))

    with torch.no_grad():
        for ids in seqs:
            probe.run(torch.tensor(ids), trace=trace)
    out = {n: x.clone() for n, x in fac.items()}
    T = max(len(s) for s in seqs)
    cos, sin = (x.to("cpu", torch.float32) for x in probe.rope_tables(torch.arange(T), torch.float32))
    train = {n for n in ("k", "v") if fac[f"{n}_down"].shape[-1] < d.head_dim}  # identity factors are exact
    for layer in tqdm(sorted(per_layer), desc="cskv: refining factors", unit="layer", file=sys.stderr):
        f = {n: x[layer].clone().requires_grad_(n[0] in train) for n, x in fac.items()}
        opt = torch.optim.Adam([x for x in f.values() if x.requires_grad], lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad()
                loss = sum(attention_error(f, q, k, v, cos[: k.shape[0]], sin[: k.shape[0]], window)
                           for q, k, v in per_layer[layer]) / len(per_layer[layer])
                loss.backward()
                opt.step()
        for n, x in f.items():
            out[n][layer] = x.detach()
    return out
