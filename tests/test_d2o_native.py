"""D2O's native eviction (kernels/cpu_evict.c, `D2O._evict_native`) against the torch path it replaces:
the same similarities, the same merged and moved bytes in every pool, and end to end the same tokens, the
same store and the same thresholds."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_llama
from kvchat_kernels import cpu, cpu_evict
from kvchat_kernels.store_ops import index_rows
from kvchat.cache.pages import PagedPools
from kvchat.engine import Engine, Request, SamplingParams
from kvchat.methods.d2o import D2O, merge_rows
from kvchat.profiles import Profile

pytestmark = pytest.mark.skipif(not cpu.enabled(), reason="the native CPU ops are not built here")


def paged(H, n, D, dtype, bs=8, seed=0, bias=False):
    """A slot of H heads holding n random tokens each, its blocks taken in a shuffled order."""
    g = torch.Generator().manual_seed(seed)
    specs = {"k": ((D,), dtype), "v": ((D,), dtype), "pos": ((), torch.int32)}
    if bias:
        specs["bias"] = ((), torch.float32)
    pp = PagedPools(2, H, bs, specs, "cpu")
    vals = {"k": torch.randn(n, H, D, generator=g).to(dtype), "v": torch.randn(n, H, D, generator=g).to(dtype),
            "pos": torch.arange(n, dtype=torch.int32).view(n, 1).expand(n, H)}
    if bias:
        vals["bias"] = torch.randn(n, H, generator=g)
    pp.append_chunk(1, {k: v[: n // 3] for k, v in vals.items()})
    pp.append_chunk(0, {k: v[:5] for k, v in vals.items()})  # interleaves the slots' blocks
    pp.append_chunk(1, {k: v[n // 3:] for k, v in vals.items()})
    return pp


def heads(pp, slot):
    return {name: torch.stack([pp.read(slot, h)[name] for h in range(pp.n_heads)]) for name in pp.pools}


def plan(H, n, C, seed):
    g = torch.Generator().manual_seed(seed)
    keep = torch.stack([torch.randperm(n, generator=g)[:C].sort().values for _ in range(H)])
    gone = torch.ones(H, n, dtype=torch.bool).scatter_(1, keep, False).nonzero()[:, 1].view(H, -1)
    return keep, gone


def rows(x, idx):
    return torch.stack([x[h, idx[h]] for h in range(x.shape[0])])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,C", [(70, 40), (33, 32), (200, 17)])
def test_paged_max_cosine_is_max_cosine_of_the_rows(dtype, n, C):
    pp = paged(3, n, 64, dtype, seed=n)
    keep, gone = plan(3, n, C, seed=C)
    best, idx = cpu_evict.paged_max_cosine(pp.pools["k"], pp.table[1], keep, gone)
    k = heads(pp, 1)["k"]
    want = cpu.max_cosine(rows(k, gone).contiguous(), rows(k, keep).contiguous())
    assert torch.equal(best, want[0]) and torch.equal(idx, want[1])
    ref = cpu.max_cosine_ref(rows(k, gone), rows(k, keep))
    torch.testing.assert_close(best, ref[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tau", [-1.0, 0.05, 2.0], ids=["all-merge", "some", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_merge_compact_is_merge_rows_then_the_compaction(dtype, tau, bias):
    """Every evicted token with u >= tau merges into its most similar kept key (`merge_rows`, the torch
    path), then each head's kept tokens move to its first storage indices in every pool; the other slot's
    blocks are untouched."""
    H, n, C, D = 3, 90, 50, 64
    pp = paged(H, n, D, dtype, seed=7, bias=bias)
    keep, gone = plan(H, n, C, seed=3)
    before, other = heads(pp, 1), {k: v.clone() for k, v in heads(pp, 0).items()}
    best, into = cpu_evict.paged_max_cosine(pp.pools["k"], pp.table[1], keep, gone)
    src = (best >= tau).view(-1).nonzero().squeeze(1)
    w = torch.zeros(best.numel()).index_put_((src,), torch.exp(best.view(-1)[src])).view_as(best)
    cpu_evict.merge_compact(list(pp.pools.values()), pp.table[1], keep, gone, into, w, math.e)
    want = {name: rows(t, keep) for name, t in before.items()}
    r, k_new, v_new = merge_rows(want["k"], want["v"], rows(before["k"], gone), rows(before["v"], gone), tau,
                                 (best, into))
    assert (r.numel() > 0) == (tau < 1)
    want["k"].view(-1, D)[r], want["v"].view(-1, D)[r] = k_new, v_new
    got = {name: t[:, :C] for name, t in heads(pp, 1).items()}  # the first C storage indices, read raw
    for name in pp.pools:
        assert torch.equal(got[name], want[name]), name
        assert torch.equal(heads(pp, 0)[name], other[name]), name


def test_merge_compact_without_merges_is_the_stores_compaction():
    a, b = paged(2, 61, 32, torch.bfloat16, seed=5), paged(2, 61, 32, torch.bfloat16, seed=5)
    keep, gone = plan(2, 61, 20, seed=9)
    cpu_evict.merge_compact(list(a.pools.values()), a.table[1], keep, gone)
    b.compact(1, list(keep))
    for name in a.pools:
        assert torch.equal(a.pools[name], b.pools[name]), name


@pytest.mark.parametrize("n", [1, 8, 37, 200])  # within a block, one whole block, partial last block, many
def test_same_rows_is_the_heads_positions_compared(n):
    """`same_rows` against reading every head and comparing: equal heads, then one row changed in each place
    a compare could miss (the first row, a block's last, the slot's last, a row past n that must not count)."""
    pp = paged(3, n + 5, 64, torch.float32, seed=n)
    pos, table = pp.pools["pos"], pp.table[1]

    def want():
        return bool((heads(pp, 1)["pos"][:, :n] == heads(pp, 1)["pos"][:1, :n]).all())

    assert want() and cpu_evict.same_rows(pos, table, n)
    for h, i in [(1, 0), (2, min(7, n - 1)), (2, n - 1), (1, n)]:
        blk, off = int(table[h, i // pp.bs]), i % pp.bs
        pos[blk, off] += 1
        assert cpu_evict.same_rows(pos, table, n) == want() == (i >= n), (h, i)
        pos[blk, off] -= 1


def generate(lm, method, native, monkeypatch, n=60):
    """Two slots of different prompts decode n tokens; -> (tokens, the store's layers, thresholds, native calls)."""
    calls = []
    with monkeypatch.context() as m:
        m.setattr(cpu_evict, "ok", lambda *a: native)
        fn = D2O._evict_native
        m.setattr(D2O, "_evict_native", lambda self, *a: (calls.append(a[1]), fn(self, *a))[1])
        eng = Engine(lm, Profile("t", methods=[method]), block_size=16, max_slots=2)
        seqs = [eng.start(Request(str(i), torch.randint(2, 256, (300 + 40 * i,), generator=torch.Generator()
                                                        .manual_seed(i)).tolist(), SamplingParams(max_new_tokens=n)))
                for i in range(2)]
        while any(s.finish is None for s in seqs):
            eng.step([s for s in seqs if s.finish is None])
        store = [{f"{s}/{h}": eng.store.read(l, s, h) for s in range(2) for h in range(lm.desc.n_kv_heads)}
                 for l in range(lm.desc.n_layers)]
        toks = [eng.result(s).token_ids for s in seqs]
        taus = [eng.methods[0]._slots[s].tau for s in range(2)]
    return toks, store, taus, calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", ["layer", "kv"])
def test_native_eviction_generates_what_the_torch_path_does(dtype, heads, monkeypatch):
    lm = tiny_llama(dtype)
    method = dict(ratio=0.3, min_budget=32, heads=heads, pool=3 if heads == "layer" else 1, slack=0.1)
    a = generate(lm, D2O(**method), True, monkeypatch)
    b = generate(lm, D2O(**method), False, monkeypatch)
    assert len(a[3]) > 8 and not b[3]  # the native path ran at prefill and in decode; the torch one never
    assert a[0] == b[0] and a[2] == b[2]
    for la, lb in zip(a[1], b[1]):
        for key in la:
            for x, y in zip(la[key], lb[key]):
                assert (x is None and y is None) or torch.equal(x, y), key


def test_scores_survive_the_buffer_growing_in_decode(monkeypatch):
    """`on_append` grows a layer's score buffer (every slot's row) when decode passes its capacity: the
    scores and tokens are those of a run whose buffer never had to grow."""
    lm = tiny_llama(torch.float32)

    def run(room: int):
        with monkeypatch.context() as m:
            if room:
                fn = D2O._row
                m.setattr(D2O, "_row", lambda self, layer, slot, top, n_slots=None:
                          fn(self, layer, slot, top + room if layer not in self._scores else top, n_slots))
            eng = Engine(lm, Profile("t", methods=[D2O(min_budget=10**9)]), block_size=16, max_slots=2)
            method = eng.methods[0]  # nothing evicted: every token's score accumulates
            seqs = [eng.start(Request(str(i), list(range(2 + i, 22 + 9 * i)), SamplingParams(max_new_tokens=70)))
                    for i in range(2)]
            while any(s.finish is None for s in seqs):
                eng.step([s for s in seqs if s.finish is None])
            scored = [layer for layer in method._scores if method._slots[0].n[layer] is not None]  # not the edges
            caps = {layer: method._scores[layer].shape[2] for layer in scored}
            scores = {layer: [method._row(layer, s, 0)[:, : max(method._slots[s].n[layer])].clone() for s in range(2)]
                      for layer in scored}
            return [eng.result(s).token_ids for s in seqs], scores, caps

    toks, scores, caps = run(0)
    want_toks, want, want_caps = run(1000)
    longest = max(s.shape[1] for v in scores.values() for s in v)
    # the buffer was made at 20 + 32 tokens: one run grew it in decode, the other had room from the start
    assert longest > 52 and all(longest <= caps[layer] < 1000 < want_caps[layer] for layer in caps)
    assert toks == want_toks and scores.keys() == want.keys() and scores
    for layer in scores:
        for got, ref in zip(scores[layer], want[layer]):
            assert got.shape == ref.shape and torch.equal(got, ref), layer
            assert (got > 0).all()  # every token, the grown part's included, received attention
