"""The cache protocol, one mechanism at a time: formats (half, stored positions, sealed round trips), layouts
(sharing layers), contradictions, compaction events, stopped prefills, rotation and repositioning.

The registry-driven matrix and the compositions are tests/test_protocol.py (its fixtures and helpers
are shared from there).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch

from conftest import tiny_model
from kvchat.cache import DenseFormat, Tokens
from kvchat.cache.stats import StepStats
from kvchat.engine import Engine, Request, SamplingParams
from kvchat.errors import ProfileError
from kvchat.methods import REGISTRY, Method
from kvchat.methods.cskv import CSKV
from kvchat.methods.d2o import D2O
from kvchat.methods.half import Half
from kvchat.methods.kivi import Kivi
from kvchat.methods.kvquant import KVQuant
from kvchat.methods.kvsharer import KVSharer
from kvchat.methods.pyramid import PyramidInfer
from kvchat.methods.razor import RazorAttention
from kvchat.methods.tova import TOVA
from kvchat.methods.window import Window
from kvchat.profiles import Profile

from test_protocol import COMPRESSING, FORMATS, LAYOUTS, check_consistent, generate, home, lm, prompt, run_checked  # noqa: F401


def test_half_holds_half_the_bytes_and_logits_stay_close(lm):
    """The seam carries a real format: 16-bit sealed groups beside an fp32 tail, attention merged across
    both. Bytes follow the formula; teacher-forced logits stay within fp16 rounding of full's."""
    ids = prompt(300)
    engines = {n: Engine(lm, Profile(n, methods=m)) for n, m in (("full", []), ("half", [Half(residual=16, group=16)]))}
    seqs = {n: e.start(Request(n, ids, SamplingParams(max_new_tokens=100))) for n, e in engines.items()}
    forced = prompt(20, seed=5)
    worst = 0.0
    for t in forced:
        out = {n: e.feed([seqs[n]], [t])[0] for n, e in engines.items()}
        worst = max(worst, (out["half"] - out["full"]).abs().max().item())
    assert 0 < worst < 5e-3 * out["full"].abs().max().item()
    st = engines["half"].store
    d = lm.desc
    n_tok = len(ids) + len(forced)
    fmt = st.format(0)
    groups = sum(fmt.slot_groups)
    tail_tokens = sum(fmt.tail.host[0])
    assert groups == d.n_kv_heads * ((n_tok - 16) // 16)  # everything but the residual is sealed
    per_group = 16 * (2 * d.head_dim * 2 + 4) + 8  # K and V in fp16, an int32 position, id + count
    tail = fmt.tail.bytes_held()
    assert fmt.bytes_held() == groups * per_group + tail == fmt.storage_bytes()
    assert tail_tokens == d.n_kv_heads * (n_tok - groups // d.n_kv_heads * 16)
    full_bytes = engines["full"].store.bytes_held()
    assert 0.5 < st.bytes_held() / full_bytes < 0.62


def test_half_refuses_a_16bit_model():
    lm16 = tiny_model("llama")
    lm16.hf.to(torch.bfloat16)
    from kvchat.model import describe

    lm16.desc = describe(lm16.hf, "tiny-bf16")
    with pytest.raises(ProfileError, match="half saves nothing"):
        Engine(lm16, Profile("h", methods=[Half()]))


def test_dense_attention_follows_stored_positions():
    """A layer reading a store another layer compacted: chunk queries see the stored tokens at or before
    their own position, whatever their storage index."""
    fmt = DenseFormat(1, 2, 16, 4, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    pos = torch.tensor([0, 3, 4, 9, 10, 11, 15, 20])
    k, v = torch.randn(8, 2, 16, generator=g), torch.randn(8, 2, 16, generator=g)
    fmt.append_chunk(0, None, k, v, pos)
    q = torch.randn(3, 4, 16, generator=g)
    q_pos = torch.tensor([5, 11, 12])
    out, rows = fmt.attend_prefill(q, 0, q_pos, 0.25, last_w=3, fresh=None)
    for i, p in enumerate(q_pos.tolist()):
        vis = pos <= p
        for hq in range(4):
            h = hq // 2
            s = (q[i, hq] @ k[vis, h].T) * 0.25
            assert torch.allclose(out[i, hq], torch.softmax(s, -1) @ v[vis, h], atol=1e-6)
            assert torch.allclose(rows[hq, i, : int(vis.sum())], torch.softmax(s, -1), atol=1e-6)
            assert rows[hq, i, int(vis.sum()):].abs().sum() == 0


# ---- layouts -------------------------------------------------------------------------------------------
@dataclass
class Share(Method):
    """A test layout: layers read earlier layers' stores by a fixed map (KVSharer's runtime side)."""

    name = "share"
    role = "layout"
    pairs: tuple = ()

    def aliases(self, desc):
        return dict(self.pairs)


def test_a_sharing_layer_computes_q_only_and_owns_nothing(lm):
    ids = prompt(120)
    full, feng = generate(lm, [], ids, n=8)
    res, eng = generate(lm, [Share(((2, 1), (4, 1)))], ids, n=8)
    L = lm.desc.n_layers
    assert not eng.store.owns(2) and not eng.store.owns(4) and len(eng.store.owned()) == L - 2
    fed = len(ids) + 7  # the last sampled token is not fed
    assert eng.runner.stats["kv_projections"] == fed * (L - 2)
    assert feng.runner.stats["kv_projections"] == fed * L
    # the owned layers hold what full holds; the sharing layers nothing
    assert eng.store.bytes_held() == sum(f.bytes_held() for f in eng.store.owned())
    assert eng.store.bytes_held() == pytest.approx(feng.store.bytes_held() * (L - 2) / L, rel=0.01)
    assert res.token_ids != full.token_ids  # it does change the model


@pytest.mark.parametrize("layouts, message", [
    ([Share(((2, 1), (3, 2)))], "a chain of shares"),
    ([Share(((1, 3),))], "can only read an earlier layer's store"),
    ([Share(((2, 1),)), Share(((2, 0),))], "layer 2 is shared twice"),
    ([Share(((9, 1),))], "layer 9 does not exist"),
    ([Half(), Half(dtype="bfloat16")], "layer 0 has two formats"),
])
def test_contradictory_profiles_are_one_line_errors(lm, layouts, message):
    with pytest.raises(ProfileError, match=message) as e:
        Engine(lm, Profile("bad", methods=layouts))
    assert "\n" not in str(e.value)


@dataclass
class _Starts(Method):
    name = "starts"
    seen: dict = None

    def __post_init__(self):
        self.seen = {}

    def after_prefill_layer(self, ctx):
        self.seen[ctx.layer] = list(ctx.chunk_start)


def test_sharing_layers_see_their_source_chunk_start_and_compose_with_pyramid(lm, home):
    eng = run_checked(lm, [Share(((3, 2), (5, 1))), PyramidInfer(min_context=16, gen_block=8), _Starts()],
                      [prompt(200)], steps=20, turns=2)
    rec = eng.methods[2]
    assert rec.seen[3] == rec.seen[2] and rec.seen[5] == rec.seen[1]  # the second turn's starts
    assert rec.seen[2] != [0, 0]  # ... which come after the first turn's tokens
    assert eng.store.tokens_kept(0)[3] == eng.store.tokens_kept(0)[2]


# ---- statistics follow compaction ----------------------------------------------------------------------
def test_step_stats_follow_a_compaction():
    rows = torch.arange(2 * 3 * 5, dtype=torch.float32).view(2, 3, 5)  # H_q 2 = 2 KV heads x group 1
    st = StepStats(1, rows=rows.clone(), slot=0)
    st.remap(0, [torch.tensor([0, 2, 4]), torch.tensor([1])])
    assert st.rows.shape == (2, 3, 3)
    assert torch.equal(st.rows[0], rows[0][:, [0, 2, 4]])
    assert torch.equal(st.rows[1, :, :1], rows[1][:, [1]]) and st.rows[1, :, 1:].abs().sum() == 0
    col = torch.arange(2 * 2 * 4, dtype=torch.float32).view(2, 2, 4)  # (B, H_kv, T)
    st = StepStats(1, colsum=col.clone(), slots=[5, 7])
    st.remap(7, [torch.tensor([3]), torch.tensor([0, 1])])
    assert torch.equal(st.colsum[0], col[0])  # another slot: untouched
    assert st.colsum[1].tolist() == [[col[1, 0, 3].item(), 0, 0, 0], [col[1, 1, 0].item(), col[1, 1, 1].item(), 0, 0]]


def test_store_compact_is_an_event(lm):
    seen = []

    @dataclass
    class Listen(Method):
        name = "listen"

        def on_compact(self, layer, slot, keep, before):
            seen.append((layer, slot, [k.tolist() for k in keep], before))

    eng = Engine(lm, Profile("t", methods=[Listen()]))
    seq = eng.start(Request("a", prompt(20), SamplingParams(max_new_tokens=4)))
    eng.store.stats = {3: StepStats(3, rows=torch.ones(6, 2, 20), slot=0)}
    eng.store.compact(3, seq.slot, [torch.arange(10), torch.arange(5, 20)])
    assert seen == [(3, 0, [list(range(10)), list(range(5, 20))], [20, 20])]
    assert eng.store.lengths(3, 0) == [10, 15]
    assert eng.store.stats[3].rows.shape == (6, 2, 15)
    eng.store.compact(3, seq.slot, [torch.arange(10), torch.arange(15)])  # keeps everything: no event
    assert len(seen) == 1


def test_tokens_roundtrip_through_a_sealed_format(lm):
    """read/write/compact in storage order across pinned, sealed and recent tokens."""
    eng = Engine(lm, Profile("t", methods=[Window(sink=3, recent=10**6), Half(residual=5, group=4)]))
    seq = eng.start(Request("a", prompt(40), SamplingParams(max_new_tokens=4)))
    fmt = eng.store.format(1)
    assert fmt.n_pin[0] == [3, 3] and sum(fmt.counts[0][0]) == 40 - 3 - 5 - (40 - 8) % 4
    before = fmt.read(0, 1)
    keep = torch.tensor([0, 2, 3, 4, 9, 10, 11, 12, 30, 37, 38, 39])
    eng.store.compact(1, 0, [torch.arange(40), keep])
    after = fmt.read(0, 1)
    assert torch.equal(after.pos, before.pos[keep])
    assert torch.allclose(after.k, before.k[keep]) and torch.allclose(after.v, before.v[keep])
    new = Tokens(torch.ones(2, lm.desc.head_dim), torch.zeros(2, lm.desc.head_dim), after.pos[[1, 5]])
    fmt.write(0, 1, torch.tensor([1, 5]), new)  # one pinned token, one sealed
    again = fmt.read(0, 1)
    assert torch.equal(again.k[[1, 5]], new.k) and torch.equal(again.v[[1, 5]], new.v)
    assert fmt.bytes_held() == fmt.storage_bytes()


# ---- a stopped prefill leaves the store as it was -------------------------------------------------------
@pytest.mark.parametrize("names", [["pyramidinfer", "d2o"], ["razor", "half"], ["window"]])
def test_a_stopped_prefill_rolls_back_and_a_retry_equals_no_stop(lm, home, names):
    from kvchat.engine import PrefillInterrupted

    make = {**COMPRESSING, **FORMATS}
    turn2 = prompt(90, seed=4)

    def first_turn():
        eng = Engine(lm, Profile("t", methods=[make[n]() for n in names]))
        seq = eng.start(Request("1", prompt(150), SamplingParams(max_new_tokens=10)))
        while not seq.finish:
            eng.step([seq])
        return eng, seq

    ref, rseq = first_turn()
    want = ref.start(Request("2", turn2, SamplingParams(max_new_tokens=10)), slot=0, pos=rseq.pos)
    while not want.finish:
        ref.step([want])

    eng, seq = first_turn()
    before = [[eng.store.read(l, 0, h) for h in range(lm.desc.n_kv_heads)] for l in range(lm.desc.n_layers)]
    asked = {"n": 0}

    def stop_after_three_layers():
        asked["n"] += 1
        return asked["n"] > 3

    progress = []
    with pytest.raises(PrefillInterrupted) as e:
        eng.start(Request("2", turn2, SamplingParams(max_new_tokens=10)), slot=0, pos=seq.pos,
                  should_stop=stop_after_three_layers, on_progress=lambda done, total: progress.append((done, total)))
    assert e.value.whole and progress[-1][1] == 90 and 0 < progress[-1][0] < 90
    for l in range(lm.desc.n_layers):
        for h in range(lm.desc.n_kv_heads):
            a, b = eng.store.read(l, 0, h), before[l][h]
            assert torch.equal(a.pos, b.pos) and torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    check_consistent(eng, [0])
    got = eng.start(Request("2", turn2, SamplingParams(max_new_tokens=10)), slot=0, pos=seq.pos)
    while not got.finish:
        eng.step([got])
    assert got.out == want.out


# ---- positions within the cache -------------------------------------------------------------------------
def test_rotating_a_key_moves_it_to_another_position(lm):
    eng = Engine(lm, Profile("full"))
    r = eng.runner
    x = torch.randn(5, lm.desc.head_dim)
    p1, p2 = torch.tensor([7, 100, 300, 301, 509]), torch.tensor([0, 3, 4, 9, 10])
    at = lambda p: r._rope_tables(x, p)  # noqa: E731
    from kvchat.engine.forward import rope

    k1 = rope(x.unsqueeze(1), *at(p1))[:, 0]
    k2 = rope(x.unsqueeze(1), *at(p2))[:, 0]
    assert torch.allclose(r.rotate(k1, p1, p2), k2, atol=1e-5)
    assert torch.allclose(r.rotate(r.rotate(k1, p1, p2), p2, p1), k1, atol=1e-5)


@pytest.mark.parametrize("names,shrinks", [(["window"], True), (["window", "half"], True), (["window", "cskv"], True),
                                           (["window", "cskv:kivi4"], True),
                                           # a full layer (pyramid's first, d2o's edges) or head (razor's
                                           # retrieval heads) holds every position: nothing to close
                                           (["pyramidinfer", "half"], False), (["razor", "d2o"], False),
                                           (["kvsharer", "window"], True)])
def test_reposition_closes_the_gaps_and_generation_goes_on(lm, home, names, shrinks):
    make = {**COMPRESSING, **FORMATS, **LAYOUTS}
    eng = Engine(lm, Profile("t", methods=[make[n]() for n in names]))
    seq = eng.start(Request("a", prompt(300), SamplingParams(max_new_tokens=20)))
    while not seq.finish:
        eng.step([seq])
    st = eng.store
    old = {(l, h): st.read(l, 0, h) for l in st.owned_layers() for h in range(lm.desc.n_kv_heads)}
    nxt = eng.reposition(0)
    held = sorted({p for t in old.values() for p in t.pos.tolist()})
    assert nxt == len(held) and (nxt < 300 if shrinks else nxt == 319)
    for (l, h), t in old.items():
        new = st.read(l, 0, h)
        want = torch.tensor([held.index(p) for p in t.pos.tolist()])
        assert new.pos.tolist() == want.tolist()
        # a sealed 16-bit key is rotated, then stored in 16 bits; a cskv key is rebuilt at its new position
        tol = 5e-3 if "half" in names else 1e-4 if "cskv" in names else 1e-5
        assert torch.allclose(new.k, eng.runner.rotate(t.k, t.pos, want), atol=tol)
        assert torch.allclose(new.v, t.v, atol=tol)
    check_consistent(eng, [0])
    more = eng.start(Request("b", prompt(40, seed=3), SamplingParams(max_new_tokens=5)), slot=0, pos=nxt)
    while not more.finish:
        eng.step([more])
    check_consistent(eng, [0])
