"""KVSharer: the paper's search (on a scripted probe and a tiny model), the share map it caches, sharing
layers that skip their K/V projections and hold nothing, the map in /stats, `profiles show`, errors."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from conftest import tiny_model
from kvchat.calibration.cache import read_json, write_json
from kvchat.calibration.kvsharer import distances, first_shares, mean_kv, ranked_pairs, resolve, search, share_map
from kvchat.engine import Engine, Request, SamplingParams
from kvchat.engine.probe import make_probe
from kvchat.errors import KvchatError, ProfileError
from kvchat.methods.kvsharer import KVSharer
from kvchat.profiles import Profile, load_profile
from kvchat.stats import layer_chart


def assert_valid(share: dict[int, int], n_layers: int) -> None:
    """What the engine demands of a share map: earlier sources only, no chains."""
    for layer, src in share.items():
        assert 0 <= src < layer < n_layers, share
        assert src not in share, f"chain {layer} -> {src} -> {share[src]}"


# ---- the search, on a probe whose answers are scripted --------------------------------------------------
class ScriptedProbe:
    """Layer l's keys and values are the constant l^2 + (the window's first id), so averaged K/V are
    known; the final hidden states have cosine `cos(share)` to the unshared ones."""

    def __init__(self, n_layers: int, cos):
        self.desc = SimpleNamespace(n_layers=n_layers)
        self.cos = cos
        self.runs = []

    def run(self, ids, aliases=None, trace=None, out="hidden"):
        share = dict(aliases or {})
        self.runs.append(share)
        T = len(ids)
        for l in range(self.desc.n_layers):
            if trace is not None:
                k = torch.full((T, 2, 4), float(l * l + ids[0]))
                trace(l, {"k": None if l in share else k, "v": None if l in share else 2 * k})
        c = 1.0 if not share else self.cos(share)
        h = torch.zeros(T, 3)
        h[:, 0], h[:, 1] = c, math.sqrt(max(0.0, 1 - c * c))  # cosine c to the unshared (1, 0, 0) rows
        return h


def test_mean_kv_divides_by_the_windows_it_summed():
    probe = ScriptedProbe(3, cos=lambda s: 1.0)
    k, v, ref = mean_kv(probe, [[0] * 5, [4] * 5, [8] * 5])
    assert k.shape == (3, 5, 2, 4) and len(ref) == 3
    assert torch.allclose(k[2], torch.full((5, 2, 4), 4.0 + 4.0)) and torch.allclose(v, 2 * k)


def test_pairs_rank_most_dissimilar_first():
    k = torch.tensor([0.0, 1.0, 4.0, 9.0]).view(4, 1, 1, 1).expand(4, 3, 2, 4)
    dist = distances(k, 2 * k)
    # D = (|di| x 2 + |di| x 2 x 2) / 2 = 3 |di| for head_dim 4 (norm of a constant 4-vector is 2 |di|)
    assert dist[3, 0] == pytest.approx(27.0) and math.isnan(dist[0, 3]) and math.isnan(dist[1, 1])
    assert ranked_pairs(dist) == [(3, 0), (3, 1), (3, 2), (2, 0), (2, 1), (1, 0)]  # |i^2 - j^2| descending


def test_the_greedy_search_of_the_paper():
    # Distances rank (4,0) (4,1) (4,2) (3,0) (3,1) (4,3) (3,2) (2,0) (2,1) (1,0). Any map where layer 4
    # reads layer 0 falls below the threshold; everything else stays above.
    probe = ScriptedProbe(5, cos=lambda s: 0.2 if s.get(4) == 0 else 0.9)
    found = search(probe, [[0] * 6, [1] * 6], layers=2, threshold=0.5)
    assert [a[:2] for a in found["accepted"]] == [[4, 1], [3, 0]]  # (4,0) rejected, (4,2) skipped: 4 shares
    assert found["map"] == {"3": 0, "4": 1} and found["tried"] == 3
    assert found["similarity"] == pytest.approx(0.9)
    assert probe.runs[2:] == [{4: 0}] * 2 + [{4: 1}] * 2 + [{4: 1, 3: 0}] * 2  # 2 windows per candidate
    assert search(ScriptedProbe(5, cos=lambda s: 0.2), [[0] * 6], 2, 0.5)["map"] == {}  # nothing passes


def test_a_hopeless_candidate_stops_early():
    from kvchat.calibration.kvsharer import similarity

    probe = ScriptedProbe(5, cos=lambda s: 0.2)
    windows = [[i] * 4 for i in range(4)]
    ref = [torch.tensor([[1.0, 0, 0]] * 4)] * 4
    # after 3 windows the mean is at most (3 x 0.2 + 1) / 4 = 0.4 <= 0.5: the 4th is never run
    assert similarity(probe, windows, ref, {4: 0}, threshold=0.5) == (pytest.approx(0.4), False)
    assert len(probe.runs) == 3
    assert similarity(probe, windows, ref, {4: 0}, threshold=0.3) == (pytest.approx(0.2), True)


def test_chains_are_resolved_like_the_notebook():
    # (4,3) first, then 3 itself shares with 1: 4 follows it to layer 1 (the notebook's re_map).
    probe = ScriptedProbe(5, cos=lambda s: 0.9)
    probe_d = torch.tensor([[0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [2, 2, 0, 0, 0], [8, 9, 5, 0, 0], [3, 3, 3, 10, 0.]])
    import kvchat.calibration.kvsharer as ks

    orig = ks.distances
    ks.distances = lambda k, v: torch.where(probe_d > 0, probe_d, torch.tensor(float("nan")))
    try:
        found = search(probe, [[0] * 4], layers=2, threshold=0.5)
    finally:
        ks.distances = orig
    assert [a[:2] for a in found["accepted"]] == [[4, 3], [3, 1]]
    assert found["map"] == {"3": 1, "4": 1}


def test_share_maps_never_chain_and_only_read_earlier_layers():
    rng = random.Random(0)
    for _ in range(200):
        accepted, shared = [], set()
        for _ in range(rng.randint(1, 12)):
            layer = rng.randrange(1, 16)
            if layer not in shared:
                accepted.append((layer, rng.randrange(layer)))
                shared.add(layer)
        share = share_map(accepted)
        assert_valid(share, 16)
        assert set(share) == shared  # every accepted layer shares; a source that later shared moved on
    assert resolve({5: 2}, 2, 1) == {5: 1, 2: 1} and resolve({5: 2}, 7, 5) == {5: 2, 7: 2}


def test_a_shorter_search_is_the_first_shares_of_a_longer_one():
    cos = lambda s: 0.2 if s.get(4) == 0 or s.get(2) == 1 else 0.9 - 0.1 * len(s)  # noqa: E731
    long = search(ScriptedProbe(5, cos), [[0] * 4], layers=3, threshold=0.5)
    for s in (1, 2, 3):
        short = search(ScriptedProbe(5, cos), [[0] * 4], layers=s, threshold=0.5)
        assert first_shares(long, s) == short


# ---- on a tiny model ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", layers=6)


def small(**kw) -> KVSharer:
    return KVSharer(**{"layers": 2, "threshold": -1.0, "samples": 2, "tokens": 24, **kw})


def test_calibration_is_deterministic_for_a_seed_and_cached(lm, monkeypatch):
    probe = make_probe(lm)
    runs = [read_json(small(layers=3).calibrate(probe, force=True)) for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]["map"]) == 3
    assert_valid({int(k): v for k, v in runs[0]["map"].items()}, lm.desc.n_layers)
    other = read_json(small(layers=3, seed=1).calibrate(probe))
    assert other["accepted"] != runs[0]["accepted"]  # other windows, other similarities
    import kvchat.methods.kvsharer as mod

    monkeypatch.setattr(mod, "search", lambda *a: pytest.fail("the cached map should be read"))
    eng = Engine(lm, Profile("k", methods=[small(layers=3)]))
    assert eng.aliases == {int(k): v for k, v in runs[0]["map"].items()}


def test_threshold_one_shares_nothing_and_says_so(lm):
    m = small(threshold=1.0)
    eng = Engine(lm, Profile("k", methods=[m]))
    assert eng.aliases == {} and len(eng.store.owned()) == lm.desc.n_layers
    assert "only 0 of 2 stayed above the threshold" in m.calibration_note(lm.desc.name)


def test_sharing_layers_skip_kv_projections_and_hold_their_share(lm):
    """The compute saved, counted: a sharing layer never runs its K/V projections (prefill and decode).
    Held bytes are at most (L - s)/L of a full cache's plus the owned layers' index overhead."""
    ids = torch.randint(2, 300, (150,), generator=torch.Generator().manual_seed(3)).tolist()
    L, s = lm.desc.n_layers, 2
    eng = Engine(lm, Profile("k", methods=[small(layers=s)]))
    full = Engine(lm, Profile("full"))
    calibration = eng.runner.stats["kv_projections"]  # the search ran through this runner's probe
    seqs = [e.start(Request("a", ids, SamplingParams(max_new_tokens=20))) for e in (eng, full)]
    for e, q in zip((eng, full), seqs):
        while not q.finish:
            e.step([q])
    fed = len(ids) + len(seqs[0].out) - 1
    assert eng.runner.stats["kv_projections"] - calibration == fed * (L - s)
    assert full.runner.stats["kv_projections"] == fed * L
    st, d = eng.store, lm.desc
    blocks = math.ceil(fed / st.block_size)
    # per owned layer and head: one partly filled block, 4-byte positions, plus block table and lengths
    overhead = sum(f.pages.meta_bytes() for f in st.owned()) + (L - s) * d.n_kv_heads * (
        (blocks * st.block_size - fed) * 2 * d.head_dim * 4 + blocks * st.block_size * 4)
    assert st.bytes_held() <= (L - s) / L * st.bytes_full() + overhead
    assert st.bytes_held() == pytest.approx(full.store.bytes_held() * (L - s) / L, rel=0.02)


def test_the_chart_shows_which_layers_share(lm):
    eng = Engine(lm, Profile("k", methods=[small()]))
    seq = eng.start(Request("a", list(range(2, 60)), SamplingParams(max_new_tokens=2)))
    lines = layer_chart(eng.kept(seq.slot), eng.store.seen[seq.slot], aliases=eng.aliases)
    assert len(lines) == lm.desc.n_layers and len(eng.aliases) == 2
    for layer, src in eng.aliases.items():
        assert lines[layer] == f"L{layer:02d} -> L{src:02d} (shared: reads its KV cache, holds none)"
    assert sum("shared" in line for line in lines) == 2
    assert layer_chart(eng.kept(seq.slot), 58) == layer_chart(eng.kept(seq.slot), 58, aliases={})


# ---- parameters and errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, message", [
    ({"layers": -1}, "kvsharer.layers must be >= 0, got -1"),
    ({"threshold": 1.5}, "kvsharer.threshold must be <= 1.0, got 1.5"),
    ({"samples": 0}, "kvsharer.samples must be >= 1, got 0"),
    ({"tokens": "many"}, "kvsharer.tokens must be an integer, got 'many'"),
    ({"data": 3}, "kvsharer.data must be a file path"),
])
def test_bad_parameters_are_one_line_errors(kw, message):
    with pytest.raises(ProfileError, match=message):
        KVSharer(**kw)


def test_errors_that_need_the_model(lm, tmp_path):
    with pytest.raises(ProfileError, match=r"kvsharer.layers must be < 6 \(tiny-llama has 6 layers"):
        Engine(lm, Profile("k", methods=[KVSharer(layers=6)]))
    with pytest.raises(KvchatError, match="run `kvchat calibrate -p kvsharer`"):
        small().bind(lm.desc, probe=None)
    with pytest.raises(KvchatError, match="no-such.txt: no such file"):
        Engine(lm, Profile("k", methods=[small(data=str(tmp_path / "no-such.txt"))]))
    text = tmp_path / "mine.txt"
    text.write_text("short")
    with pytest.raises(KvchatError, match="the calibration text has 5 tokens; 24 per sample are needed"):
        Engine(lm, Profile("k", methods=[small(data=str(text))]))
    assert KVSharer(layers=0).calibrate(make_probe(lm)) is None  # nothing to search


def test_profiles_show_prints_the_map_or_how_to_make_one():
    from kvchat.cli import main
    from kvchat.model import EMBEDDED

    out = CliRunner().invoke(main, ["profiles", "show", "kvsharer"])
    assert out.exit_code == 0, out.output
    assert "no share map for smollm2-135m-instruct yet; `kvchat calibrate -p PROFILE` makes one" in out.output
    shipped = load_profile("kvsharer").methods[0]
    write_json(shipped.cache_file(EMBEDDED), {"model": EMBEDDED, "params": shipped.calib_params(),
                                              "map": {"9": 3, "12": 3}, "accepted": [], "tried": 4,
                                              "similarity": 0.91})
    out = CliRunner().invoke(main, ["profiles", "show", "kvsharer"])
    assert f"kvsharer share map for {EMBEDDED}: L09->L03, L12->L03; 2 layers share" in out.output
    assert json.loads(shipped.cache_file(EMBEDDED).read_text())["map"] == {"9": 3, "12": 3}
