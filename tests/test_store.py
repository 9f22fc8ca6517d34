"""The paged store: compaction, byte accounting that is physical, the window profile's flat footprint."""

from __future__ import annotations

import torch

from conftest import tiny_model
from kvchat.cache import DenseFormat
from kvchat.cache.format import Format, Tokens
from kvchat.engine import Engine, Request, SamplingParams
from kvchat.methods.window import Window
from kvchat.profiles import Profile

CPU = torch.device("cpu")


def used_storage(fmt: DenseFormat) -> int:
    """Storage actually behind the blocks the tables reference, measured on the tensors themselves."""
    pg = fmt.pages
    ids = set()
    for s in range(pg.n_slots):
        for h in range(pg.n_heads):
            n = -(-int(pg.lengths[s, h]) // pg.bs)
            ids.update(pg.table[s, h, :n].tolist())
    per_block = sum(t[0].nbytes for t in pg.pools.values())
    return len(ids) * per_block + pg.table.nbytes + pg.lengths.nbytes


def test_append_read_compact_roundtrip():
    st = DenseFormat(n_slots=2, n_kv=3, head_dim=8, block_size=4, dtype=torch.float32, device=CPU)
    k, v = torch.randn(11, 3, 8), torch.randn(11, 3, 8)
    st.append_chunk(1, None, k, v, torch.arange(100, 111))
    st.append_step([1], torch.tensor([1]), None, torch.randn(1, 3, 8), torch.randn(1, 3, 8), torch.tensor([111]))
    keep = [torch.tensor([0, 1, 5, 10]), torch.arange(12), torch.tensor([11])]
    before = [st.read(1, h) for h in range(3)]
    assert before[0].pos.tolist() == list(range(100, 112)) and torch.equal(before[2].k[:11], k[:, 2])
    st.compact(1, keep)
    assert st.pages.lengths[1].tolist() == [4, 12, 1] == st.host[1]
    for h in range(3):
        got = st.read(1, h)
        for a, b in zip(got, before[h]):
            if a is not None:
                assert torch.equal(a, b[keep[h]])
    assert st.pages.slot_blocks[1] == 1 + 3 + 1
    assert used_storage(st) == st.bytes_held()
    st.free_slot(1)
    assert st.pages.slot_blocks[1] == 0 and len(st.pages.free) == st.pages.capacity


def test_read_heads_and_write_many_match_the_per_head_calls():
    st = DenseFormat(n_slots=2, n_kv=3, head_dim=8, block_size=4, dtype=torch.bfloat16, device=CPU, with_bias=True)
    st.append_chunk(0, None, torch.randn(10, 3, 8), torch.randn(10, 3, 8), torch.arange(50, 60))
    both = st.read_heads(0)
    assert both.k.shape == (3, 10, 8) and both.bias.shape == (3, 10)
    for h in range(3):
        for a, b in zip(both, st.read(0, h)):
            assert torch.equal(a[h], b)
    # The Format default (per-head reads, stacked) gives the same.
    for a, b in zip(both, Format.read_heads(st, 0)):
        assert torch.equal(a, b)
    heads, idx = torch.tensor([2, 0, 2]), torch.tensor([9, 3, 0])  # several heads, block tails included
    new = Tokens(torch.randn(3, 8).bfloat16(), torch.randn(3, 8).bfloat16(), torch.tensor([7, 8, 9], dtype=torch.int32),
                 torch.tensor([0.5, 1.5, 2.5]))
    st.write_many(0, heads, idx, new)
    for n, (h, i) in enumerate(zip(heads.tolist(), idx.tolist())):
        got = st.read(0, h, torch.tensor([i]))
        assert torch.equal(got.k[0], new.k[n]) and int(got.pos[0]) == int(new.pos[n]) and float(got.bias[0]) == float(new.bias[n])
    assert torch.equal(st.read(0, 1).k, both.k[1])  # head 1 untouched
    for fn in (st.read_many, lambda *a: Format.read_many(st, *a)):  # one gather, and the per-head default
        got = fn(0, heads, idx)
        assert torch.equal(got.k, new.k) and torch.equal(got.pos, new.pos) and torch.equal(got.bias, new.bias)
    # same_positions: one gather of the position pool, and the per-head default, agree.
    same = lambda: (st.same_positions(0), Format.same_positions(st, 0))  # noqa: E731
    assert same() == (False, False)  # write_many gave heads 0 and 2 other positions
    st.write_many(0, torch.tensor([0, 2, 2]), torch.tensor([3, 9, 0]), Tokens(new.k, new.k, torch.tensor([53, 59, 50],
                                                                               dtype=torch.int32), new.bias))
    assert same() == (True, True)
    st.compact(0, [torch.arange(10), torch.arange(4), torch.arange(10)])
    assert st.read_heads(0) is None  # heads of different lengths: no stacked read
    assert same() == (False, False)


def test_trim_gives_storage_back_and_keeps_contents():
    st = DenseFormat(n_slots=1, n_kv=2, head_dim=4, block_size=4, dtype=torch.float32, device=CPU)
    st.append_chunk(0, None, torch.randn(200, 2, 4), torch.randn(200, 2, 4), torch.arange(200))
    keep = [torch.arange(190, 200)] * 2
    st.compact(0, keep)
    before = [st.read(0, h) for h in range(2)]
    cap = st.bytes_reserved()
    st.trim()
    assert st.bytes_reserved() < cap / 5
    for h in range(2):
        assert all(torch.equal(a, b) for a, b in zip(st.read(0, h)[:3], before[h][:3]))
    assert st.read(0, 0).pos.tolist() == list(range(190, 200))


def test_full_profile_bytes_are_physical_and_close_to_full():
    lm = tiny_model("llama")
    eng = Engine(lm, Profile("full"), max_slots=2, block_size=16)
    reqs = [Request("a", list(range(1, 70)), SamplingParams(max_new_tokens=9)),
            Request("b", list(range(1, 33)), SamplingParams(max_new_tokens=5))]
    live = [eng.start(r) for r in reqs]
    for _ in range(4):
        eng.step(live)
    store = eng.store
    assert store.bytes_held() == sum(used_storage(st) for st in store.owned())
    full = store.bytes_full()
    d = lm.desc
    # At most one partly filled block per (slot, layer, head), plus the index tensors.
    block = 16 * d.head_dim * 2 * 4
    meta = sum(st.pages.table.nbytes + st.pages.lengths.nbytes for st in store.owned())
    pos_bytes = sum(st.pages.slot_blocks[s] * 16 * 4 for st in store.owned() for s in range(2))
    overhead = store.bytes_held() - full
    assert 0 <= overhead <= 2 * d.n_layers * d.n_kv_heads * block + pos_bytes + meta
    # Index metadata stays lean: positions and tables under 2% of the K/V bytes here (head_dim 16).
    assert (pos_bytes + meta) / full < 0.15


def test_window_bytes_stay_flat_during_decode():
    lm = tiny_model("llama")
    prof = Profile("w", methods=[Window(sink=4, recent=32)])
    eng = Engine(lm, prof, block_size=8)
    seq = eng.start(Request("a", list(range(1, 100)), SamplingParams(max_new_tokens=300)))
    held, full = [], []
    while not seq.finish:
        eng.step([seq])
        held.append(eng.store.bytes_held())
        full.append(eng.store.bytes_full())
    assert len(held) > 200
    # Bounded: after the first eviction cycles, held bytes never exceed what they reached early on.
    assert max(held[50:]) <= max(held[:50])
    assert max(held) - min(held[10:]) <= lm.desc.n_layers * lm.desc.n_kv_heads * eng.store.layers[0].pages.block_bytes * 2
    assert full[-1] > 3 * full[0] / 2 and held[-1] < full[-1] / 3
    assert all(n <= 4 + 32 + 8 for heads in eng.store.tokens_kept(0) for n in heads)
    st = eng.store
    assert st.bytes_held() == sum(used_storage(s) for s in st.owned())


def test_window_that_holds_everything_equals_full():
    lm = tiny_model("mistral")
    prompt = list(range(3, 60))
    full = Engine(lm, Profile("full")).generate(prompt, SamplingParams(max_new_tokens=30)).token_ids
    win = Engine(lm, Profile("w", methods=[Window(sink=4, recent=200)])).generate(prompt, SamplingParams(max_new_tokens=30))
    assert win.token_ids == full


def test_window_evicts_after_prefill_and_differs_when_small():
    lm = tiny_model("llama")
    eng = Engine(lm, Profile("w", methods=[Window(sink=2, recent=10)]), block_size=4)
    res = eng.generate(list(range(1, 80)), SamplingParams(max_new_tokens=3))
    assert res.kv["peak_bytes_held"] < res.kv["peak_bytes_full"] / 3
    assert res.kv["saved"] > 0.6


def test_a_sequences_bytes_do_not_depend_on_what_ran_before_it():
    """A request's `kv` figure is its own: a long sequence in another slot earlier widens the block table
    (the run's total counts that), but not the next request's bytes (batch lines must not depend on order)."""
    from kvchat.cache.pages import PagedPools

    def short_after(long_tokens: int) -> tuple[int, int]:
        p = PagedPools(n_slots=2, n_heads=3, block_size=4, specs={"k": ((8,), torch.float32)}, device="cpu")
        if long_tokens:
            p.reserve(0, [long_tokens] * 3)
            p.free_slot(0)
        p.reserve(1, [5, 6, 7])
        return p.bytes_held_slot(1), p.bytes_held()

    fresh, after = short_after(0), short_after(64)
    assert fresh[0] == after[0]
    assert after[1] > fresh[1]  # the wider table is real memory, and the total holds it


def test_freed_blocks_are_handed_out_again_in_ascending_order():
    """A compaction's freed run of blocks goes back so the next allocation takes it in address order: the
    attention kernel reads a head's blocks twice as fast when they ascend (the prefetchers follow; measured
    on descending tables: half the bandwidth), and D2O's prefill eviction of one slot feeds the next slot's
    prefill from exactly those blocks."""
    st = DenseFormat(n_slots=2, n_kv=2, head_dim=4, block_size=4, dtype=torch.float32, device=CPU)
    st.append_chunk(0, None, torch.randn(40, 2, 4), torch.randn(40, 2, 4), torch.arange(40))
    st.compact(0, [torch.arange(4)] * 2)  # each head frees 9 of its 10 blocks
    st.append_chunk(1, None, torch.randn(36, 2, 4), torch.randn(36, 2, 4), torch.arange(36))
    for h in range(2):
        ids = st.pages.blocks[1][h]
        assert len(ids) == 9 and ids == sorted(ids), ids
