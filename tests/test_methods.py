"""Fast invariants of pyramid, razor and d2o on a tiny random Llama (offline, seconds)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kvchat.engine import Engine, Request, SamplingParams
from kvchat.errors import ProfileError
from kvchat.methods.d2o import D2O
from kvchat.methods.pyramid import PyramidInfer, carried, cosine_schedule, distance_scores, pivotal
from kvchat.model import LoadedModel, describe
from kvchat.profiles import Profile, load_profile, parse_profile

PROFILES = Path(__file__).resolve().parents[1] / "profiles"


class StubTokenizer:
    bos_token_id = 1

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    hf = LlamaForCausalLM(cfg).eval()
    return LoadedModel(hf=hf, tokenizer=StubTokenizer(), desc=describe(hf, "tiny-llama"), eos_ids=frozenset())


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path))
    return tmp_path


def prompt(n=300, seed=1):
    return torch.randint(2, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(lm, methods, ids, n=24, block_size=16):
    """Greedy generation of n tokens (n=0: prefill only); the slot stays live so its store can be read."""
    eng = Engine(lm, Profile("t", methods=methods), block_size=block_size)
    seq = eng.start(Request("t", ids, SamplingParams(max_new_tokens=max(n, 1))))
    while seq.finish is None and n:
        eng.step([seq])
    return eng.result(seq), eng


# ---- profiles -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["pyramid", "razor", "d2o"])
def test_shipped_profiles_load(name):
    p = load_profile(str(PROFILES / f"{name}.yaml"))
    assert p.name == name and len(p.methods) == 1 and p.paper.startswith("https://arxiv.org/")


@pytest.mark.parametrize("method, params, needle", [
    ("razor", {"recent": -4}, "razor.recent must be >= 1, got -4"),
    ("pyramidinfer", {"decay": 1.3}, "pyramidinfer.decay must be <= 1.0, got 1.3"),
    ("pyramidinfer", {"recent_ratio": -0.1}, "pyramidinfer.recent_ratio must be >= 0.0, got -0.1"),
    ("d2o", {"ratio": 1.5}, "d2o.ratio must be <= 1.0, got 1.5"),
    ("d2o", {"obs_window": -1}, "d2o.obs_window must be >= 1, got -1"),
    ("d2o", {"budget": 3}, "unknown key d2o.budget; d2o accepts ratio, recent_share"),
    ("razor", {"window": 3}, "unknown key razor.window; razor accepts sink, recent"),
    ("pyramidinfer", {"sink": "four"}, "pyramidinfer.sink must be an integer, got 'four'"),
    ("pyramidinfer", {"obs_window": -8}, "pyramidinfer.obs_window must be >= 0, got -8"),
    ("pyramidinfer", {"heads": "min"}, "pyramidinfer.heads must be mean, max or group, got 'min'"),
    ("pyramidinfer", {"carry": 1.5}, "pyramidinfer.carry must be <= 1.0, got 1.5"),
])
def test_bad_parameters_are_one_line(method, params, needle):
    with pytest.raises(ProfileError) as e:
        parse_profile({"name": "x", "methods": [{method: params}]}, "x.yaml")
    assert needle in str(e.value) and "\n" not in str(e.value)


# ---- pure selection functions -------------------------------------------------------------------------
def test_pivotal_keeps_sinks_and_top_scores():
    scores = torch.tensor([0.0, 0.1, 5.0, 0.2, 4.0, 3.0, 0.3])
    keep = pivotal(scores, torch.arange(7), k=4, sink=1)
    assert keep.tolist() == [0, 2, 4, 5]  # sink 0, then the three highest


def test_distance_scores_weight_later_queries():
    rows = torch.zeros(2, 2, 3)
    rows[:, 0, 0] = 1.0  # the earlier query looks at token 0
    rows[:, 1, 1] = 1.0  # the later query at token 1
    s = distance_scores(rows, 2.0)
    assert s[1] == pytest.approx(2 * s[0]) and s[2] == 0


def test_distance_scores_head_reductions():
    rows = torch.zeros(4, 1, 3)  # 4 query heads in 2 KV groups of 2
    rows[0, 0, 0] = 1.0  # one head of group 0 looks at token 0
    rows[1:, 0, 1] = 1.0  # the three other heads at token 1
    assert distance_scores(rows, 1.0).tolist() == [0.25, 0.75, 0.0]
    assert distance_scores(rows, 1.0, heads="max").tolist() == [1.0, 1.0, 0.0]
    assert distance_scores(rows, 1.0, heads="group", groups=2).tolist() == [0.5, 1.0, 0.0]


def test_carried_scores_keep_earlier_layers_credit():
    first = torch.tensor([6.0, 1.0, 1.0, 2.0])  # token 0 is pivotal in the earlier layer...
    second = torch.tensor([0.0, 3.0, 3.0, 4.0])  # ...and overlooked in this one
    acc = carried(second, carried(first, None, 1.0), 1.0)
    assert acc.tolist() == pytest.approx([0.6, 0.4, 0.4, 0.6])
    assert pivotal(acc, torch.arange(4), k=2, sink=0).tolist() == [0, 3]
    assert pivotal(carried(second, carried(first, None, 1.0), 0.0), torch.arange(4), 2, 0).tolist() != [0, 3]


def test_cosine_schedule_ends():
    assert cosine_schedule(0, 30, 0.5) == 1.0
    assert 0.5 < cosine_schedule(29, 30, 0.5) < 0.51


# ---- on the tiny model --------------------------------------------------------------------------------
KEEP_ALL = {
    "pyramid": lambda: PyramidInfer(decay=1.0, gen_compress=1.0, gen_decay=1.0),
    "d2o": lambda: D2O(min_budget=10**6),
    "razor": lambda: __import__("kvchat.methods.razor", fromlist=["x"]).RazorAttention(
        echo_ratio=1.0, calib_tokens=16, calib_repeats=2),
}


@pytest.mark.parametrize("name", list(KEEP_ALL))
def test_keep_everything_equals_full(tiny, home, name):
    ids = prompt(200)
    full, full_eng = run(tiny, [], ids)
    got, eng = run(tiny, [KEEP_ALL[name]()], ids)
    assert got.token_ids == full.token_ids
    assert eng.kept(0) == full_eng.kept(0)  # nothing evicted, on any layer or head
    # The same blocks; razor's also carry a float32 logit bias per token slot (its compensation pool).
    extra = sum(st.pages.slot_blocks[0] for st in eng.store.owned()) * eng.store.block_size * 4 if name == "razor" else 0
    assert got.kv["bytes_held"] == full.kv["bytes_held"] + extra


def test_pyramid_drops_hidden_states_and_compacts(tiny):
    ids = prompt(400)
    m = PyramidInfer(recent_ratio=0.1, decay=0.5, min_context=16)
    res, eng = run(tiny, [m], ids, n=40)
    kept = [l[0] for l in eng.store.tokens_kept(0)]
    assert kept[0] == 400 + 39 and kept[-1] < kept[1] < kept[0]  # the 40th token is sampled, not fed
    assert eng.runner.stats["prefill_layer_tokens"] < 6 * 400  # later layers ran on fewer tokens
    assert res.kv["saved"] > 0.2


def test_pyramid_decode_counts_per_layer(tiny):
    ids = prompt(100)
    m = PyramidInfer(recent_ratio=0.1, decay=0.5, min_context=16, gen_block=8)
    _, eng = run(tiny, [m], ids, n=0)
    after_prefill = [l[0] for l in eng.store.tokens_kept(0)]
    res, eng = run(tiny, [PyramidInfer(recent_ratio=0.1, decay=0.5, min_context=16, gen_block=8)], ids, n=60)
    final = [l[0] for l in eng.store.tokens_kept(0)]
    # Only generated tokens are compressed: no layer loses prompt tokens during decode (the official
    # layer-0 counter re-compressed them every step), and the deepest layer keeps the fewest.
    keep = eng.methods[0]._gen_keep
    for l, (a, b) in enumerate(zip(after_prefill, final)):
        assert a <= b <= a + 59 and (b - a) >= 59 - (59 // 8) * (8 - keep[l])
    assert final[-1] - after_prefill[-1] < final[0] - after_prefill[0]


def test_d2o_bounded_decode_and_budgets(tiny):
    ids = prompt(300)
    m = D2O(ratio=0.2, min_budget=32)
    res, eng = run(tiny, [m], ids, n=80)
    st = eng.methods[0]._slots[0]
    kept = eng.store.tokens_kept(0)
    for l, b in enumerate(st.budgets):
        if b is None:
            assert kept[l] == [379, 379]
        else:
            assert all(b <= n < b + eng.store.block_size for n in kept[l])
    assert res.kv["saved"] > 0.3


def test_d2o_slack_evicts_less_often_and_stays_within_it(tiny, monkeypatch):
    ids = prompt(300)
    calls, evict = [], D2O._evict
    monkeypatch.setattr(D2O, "_evict", lambda self, *a: (calls.append(a[1]), evict(self, *a))[1])
    n_evict = {}
    for slack in (0.0, 0.5):
        calls.clear()
        res, eng = run(tiny, [D2O(ratio=0.5, min_budget=32, slack=slack)], ids, n=80)
        st = eng.methods[0]._slots[0]
        for l, (b, kept) in enumerate(zip(st.budgets, eng.store.tokens_kept(0))):
            if b is not None:
                assert all(b <= n < b + max(eng.store.block_size, int(slack * b)) for n in kept)
        n_evict[slack] = len(calls)
    assert 0 < n_evict[0.5] < n_evict[0.0]
    with pytest.raises(Exception, match="slack"):
        D2O(slack=1.5)


@pytest.mark.parametrize("live", [[0, 1, 2], [0, 2]], ids=["consecutive", "gap"])
def test_d2o_adds_each_steps_column_sums_to_its_own_slots(tiny, live):
    """Every slot's scores sit in one buffer per layer (`decode_colsum_into`) and the engine adds a step's
    column sums into it before the layer's hook: each live slot's row gains its own attention (every
    query head's probabilities sum to 1, so a KV head's gain over its tokens sums to the group size and
    is positive on each token), a slot not in the step gains nothing, and past a head's length stays 0."""
    eng = Engine(tiny, Profile("t", methods=[D2O.keep_all()]), max_slots=3)  # scored every step, never evicted
    m = eng.methods[0]
    G = tiny.desc.n_heads // tiny.desc.n_kv_heads
    seqs = [eng.start(Request(str(i), prompt(40 + 7 * i, seed=i), SamplingParams(max_new_tokens=50))) for i in range(3)]
    checked, before, into, after_hook = [], {}, m.decode_colsum_into, m.after_decode_layer

    def snapshot(layer):
        buf = into(layer)
        before[layer] = None if buf is None else buf.clone()
        return buf

    def spy(ctx):
        was = before.pop(ctx.layer, None)
        if was is not None:
            gain = m._scores[ctx.layer] - was
            for s in range(3):
                if s not in ctx.slots:
                    assert torch.equal(gain[s], torch.zeros_like(gain[s])), (ctx.layer, s)
                    continue
                for h, n in enumerate(m._slots[s].n[ctx.layer]):
                    assert (gain[s, h, :n] > 0).all(), (ctx.layer, s, h)
                    torch.testing.assert_close(gain[s, h, :n].sum(), torch.tensor(float(G)))
                    assert torch.equal(m._scores[ctx.layer][s, h, n:], torch.zeros_like(gain[s, h, n:]))
                checked.append((ctx.layer, s))
        after_hook(ctx)

    m.decode_colsum_into, m.after_decode_layer = snapshot, spy
    for _ in range(4):
        eng.step([seqs[i] for i in live])
    scored = [l for l in range(tiny.desc.n_layers) if m._slots[0].n[l] is not None]
    assert scored and sorted(set(checked)) == sorted((l, s) for l in scored for s in live)


def test_razor_heads_window_and_compensation(tiny, home):
    from kvchat.methods.razor import RazorAttention

    ids = prompt(300)
    full, feng = run(tiny, [], ids, n=0)
    m = RazorAttention(sink=2, recent=32, window_ratio=0.0, echo_ratio=0.1, induction_ratio=0.1,
                       calib_tokens=16, calib_repeats=2)
    res, eng = run(tiny, [m], ids, n=0)
    W = 32
    for l, heads in enumerate(eng.store.tokens_kept(0)):
        for h, n in enumerate(heads):
            assert n == (300 if h in eng.methods[0].heads[l] else 2 + 1 + W)
    # Layer 0 sees the same input either way: its compensation token is the mean of the dropped K/V
    # and its logit bias is ln(count).
    l0 = eng.store.layers[0]
    h = next(h for h in range(2) if h not in eng.methods[0].heads[0])
    k, v, pos, bias = l0.read(0, h, torch.tensor([2]))
    fk, fv, *_ = feng.store.layers[0].read(0, h, torch.arange(2, 300 - W))
    assert torch.allclose(k[0], fk.mean(0), atol=1e-5) and torch.allclose(v[0], fv.mean(0), atol=1e-5)
    assert bias[0].item() == pytest.approx(math.log(300 - W - 2))
    assert int(pos[0]) == 300 - W - 1


def test_razor_running_mean_during_decode(tiny, home):
    from kvchat.methods.razor import RazorAttention

    m = RazorAttention(sink=2, recent=32, window_ratio=0.0, echo_ratio=0.0, induction_ratio=0.0,
                       calib_tokens=16, calib_repeats=2)
    res, eng = run(tiny, [m], prompt(100), n=70)
    for heads in eng.store.tokens_kept(0):
        assert all(2 + 1 + 32 <= n <= 2 + 1 + 32 + eng.store.block_size for n in heads)
    l0 = eng.store.layers[0]
    _, _, _, bias = l0.read(0, 0, torch.tensor([2]))
    n_kept = l0.host[0][0]
    assert bias[0].item() == pytest.approx(math.log(100 + 69 - (n_kept - 1)))


def test_razor_slack_bounds_the_heads_and_folds_less_often(tiny, home, monkeypatch):
    from kvchat.methods.razor import RazorAttention

    calls, fold = [], RazorAttention._fold
    monkeypatch.setattr(RazorAttention, "_fold", lambda self, *a: (calls.append(a[2]), fold(self, *a))[1])
    n_fold = {}
    for slack in (0.0, 1.0):
        calls.clear()
        m = RazorAttention(sink=2, recent=32, window_ratio=0.0, echo_ratio=0.0, induction_ratio=0.0,
                           calib_tokens=16, calib_repeats=2, slack=slack)
        res, eng = run(tiny, [m], prompt(100), n=70)
        for heads in eng.store.tokens_kept(0):
            assert all(2 + 1 + 32 <= n <= 2 + 1 + 32 + max(eng.store.block_size, int(slack * 32)) for n in heads)
        l0 = eng.store.layers[0]
        assert l0.read(0, 0, torch.tensor([2])).bias[0].item() == pytest.approx(math.log(100 + 69 - (l0.host[0][0] - 1)))
        n_fold[slack] = len(calls)
    assert 0 < n_fold[1.0] < n_fold[0.0]


def test_razor_compensation_is_the_running_mean_of_what_it_folds():
    from kvchat.cache import DenseFormat
    from kvchat.methods.razor import RazorAttention

    fmt = DenseFormat(n_slots=1, n_kv=3, head_dim=4, block_size=4, dtype=torch.float32, device=torch.device("cpu"),
                      with_bias=True)
    k, v = torch.randn(12, 3, 4), torch.randn(12, 3, 4)
    fmt.append_chunk(0, None, k, v, torch.arange(12))
    store = type("S", (), {"read_many": lambda self, layer, slot, h, i: fmt.read_many(slot, h, i)})()
    m = RazorAttention.__new__(RazorAttention)
    # head 0: first fold of tokens 2..6; head 2: its comp token at 2 stands for 3 earlier tokens, fold 3..6
    got = m._compensation(store, 0, 0, [(0, -1, 2, 5), (2, 2, 3, 4)], torch.tensor([0.0, 0.0, 3.0]))
    assert torch.allclose(got.k[0], k[2:7, 0].mean(0)) and torch.allclose(got.v[0], v[2:7, 0].mean(0))
    assert torch.allclose(got.k[1], (3 * k[2, 2] + k[3:7, 2].sum(0)) / 7)
    assert torch.allclose(got.v[1], (3 * v[2, 2] + v[3:7, 2].sum(0)) / 7)
    assert got.pos.tolist() == [6, 6] and got.bias.tolist() == pytest.approx([math.log(5), math.log(7)])


def test_razor_calibration_deterministic_and_cached(tiny, home):
    from kvchat.calibration import calibrate
    from kvchat.calibration.razor import random_repeats, score_heads
    from kvchat.engine.probe import make_probe
    from kvchat.methods.razor import RazorAttention

    probe = make_probe(tiny)
    assert torch.equal(random_repeats(256, 16, 4, 7, 1), random_repeats(256, 16, 4, 7, 1))
    assert not torch.equal(random_repeats(256, 16, 4, 7, 1), random_repeats(256, 16, 4, 8, 1))
    a, b = score_heads(probe, 16, 3, seed=7), score_heads(probe, 16, 3, seed=7)
    assert a == b
    path = calibrate(probe, RazorAttention(calib_tokens=16, calib_repeats=3, calib_seed=7))
    assert path.is_file() and path.is_relative_to(home / "calibrations" / "tiny-llama")
    assert calibrate(probe, PyramidInfer()) is None  # no calibration needed
