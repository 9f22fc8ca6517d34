"""D2O's pure functions: which tokens a layer keeps, the layers' budgets and densities, the merges of
evicted tokens into kept ones and the similarity kernel the merges take (the engine-level D2O tests are
in test_methods.py)."""

from __future__ import annotations

import math

import pytest
import torch

from kvchat.methods.d2o import D2O, density, layer_budgets, merge, merge_rows


def test_d2o_keeps_top_scorers_recent_and_sinks():
    m = D2O(recent_share=0.25, sink=1)
    scores = torch.tensor([0.0, 9.0, 0.1, 8.0, 0.2, 7.0, 0.3, 0.4, 0.0, 0.0])
    keep = m.keep_indices(scores, budget=8)  # 2 recent, 6 old: sink + top five of the rest
    old = scores[:8].clone()
    old[0] = float("inf")
    assert keep[:6].tolist() == sorted(torch.topk(old, 6).indices.tolist())
    assert keep[6:].tolist() == [8, 9]


def test_d2o_budgets_leave_edge_layers_whole_and_respect_min():
    b = layer_budgets([0.1, 0.9, 0.5, 0.2, 0.8, 0.0], n_tokens=1000, ratio=0.2, min_budget=64)
    assert b[0] is None and b[1] is None and b[-1] is None
    assert b[3] > b[2] > b[4]  # sparser attention (higher variance) -> smaller budget
    assert layer_budgets([0.5] * 6, 40, 0.2, 64)[2] == 64


def test_density_is_min_max_normalised_variance_over_heads():
    # 3 heads, 2 query rows, 4 keys: uniform (column sums 0.5 each, variance 0), one-hot on key 0
    # (sums [2, 0, 0, 0], variance 1), split over keys 0-1 (sums [1, 1, 0, 0], variance 1/3).
    rows = torch.zeros(3, 2, 4)
    rows[0] = 0.25
    rows[1, :, 0] = 1.0
    rows[2, :, :2] = 0.5
    assert density(rows, 4) == pytest.approx((0 + 1 + 1 / 3) / 3)
    # Only the first n keys count: over keys 0-1 the split head is flat too.
    assert density(rows, 2) == pytest.approx(1 / 3)
    assert density(rows[:1].expand(3, 2, 4), 4) == 0.0  # all heads alike: nothing to normalise by


def test_d2o_merge_matches_paper_weighted_combination():
    kept_k = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    kept_v = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    ev_k = torch.tensor([[1.0, 0.2], [0.9, 0.1], [-1.0, 0.05]])  # two close to key 0, one close to nothing
    ev_v = torch.tensor([[10.0, 0.0], [20.0, 0.0], [30.0, 0.0]])
    k, v, best = merge(kept_k, kept_v, ev_k, ev_v, tau=0.5)
    u = torch.tensor([1.0 / math.sqrt(1.04), 0.9 / math.sqrt(0.82)])  # cos with kept key 0
    assert best[:2].tolist() == pytest.approx(u.tolist(), abs=1e-6)
    denom = math.e + u.exp().sum()  # per kept token: self term e plus the merged tokens' exp(u)
    want_k0 = (math.e * kept_k[0] + u[0].exp() * ev_k[0] + u[1].exp() * ev_k[1]) / denom
    want_v0 = (math.e * kept_v[0] + u[0].exp() * ev_v[0] + u[1].exp() * ev_v[1]) / denom
    assert torch.allclose(k[0], want_k0) and torch.allclose(v[0], want_v0)
    # Kept key 1 only attracts the third token, whose best similarity (0.05 / |e|) is below tau: unchanged.
    assert torch.equal(k[1], kept_k[1]) and torch.equal(v[1], kept_v[1])


def test_d2o_merge_rows_are_the_rows_merge_changes():
    torch.manual_seed(0)
    kept_k, kept_v = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)  # leading dims: slots x heads
    ev_k, ev_v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)
    k, v, best = merge(kept_k, kept_v, ev_k, ev_v, tau=0.2)
    rows, rk, rv = merge_rows(kept_k, kept_v, ev_k, ev_v, tau=0.2)
    changed = (k != kept_k).any(-1).view(-1).nonzero().squeeze(1)
    assert rows.numel() > 0 and torch.equal(rows, changed)
    assert torch.equal(rk, k.view(-1, 8)[rows]) and torch.equal(rv, v.view(-1, 8)[rows])
    assert not merge_rows(kept_k, kept_v, ev_k, ev_v, tau=2.0)[0].numel()  # nothing passes: nothing changes


def test_d2o_similarity_takes_the_native_kernel_with_the_references_answer(monkeypatch):
    """A (heads, tokens, D) eviction on the CPU goes to cpu_similar.c and merges as the torch path does."""
    from kvchat_kernels import cpu

    torch.manual_seed(1)
    kept_k, kept_v = torch.randn(3, 40, 64).bfloat16(), torch.randn(3, 40, 64).bfloat16()
    ev_k, ev_v = torch.randn(3, 9, 64).bfloat16(), torch.randn(3, 9, 64).bfloat16()
    calls = []
    native = cpu.max_cosine
    monkeypatch.setattr(cpu, "max_cosine", lambda a, b: calls.append(a.shape) or native(a, b))
    rows, rk, rv = merge_rows(kept_k, kept_v, ev_k, ev_v, tau=0.1)
    assert calls == [(3, 9, 64)] and rows.numel() > 0
    ref = merge_rows(kept_k, kept_v, ev_k, ev_v, tau=0.1, sim=cpu.max_cosine_ref(ev_k, kept_k))
    # The same rows; values to one bfloat16 rounding (exp of similarities equal to float32 rounding).
    assert torch.equal(rows, ref[0])
    for got, want in ((rk, ref[1]), (rv, ref[2])):
        assert torch.allclose(got.float(), want.float(), rtol=2 ** -7, atol=1e-6)
