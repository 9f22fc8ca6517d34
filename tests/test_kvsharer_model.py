"""KVSharer on the embedded SmolLM2: layers 0 equals full, the shipped profiles' needles and bytes, the
calibration deterministic for a seed, `kvchat calibrate` printing the map.

The shipped `kvsharer` map is calibrated once for the whole run (the `embedded` fixture shares
KVCHAT_HOME/calibrations); the three profiles use the same parameters, so the same map.
"""

from __future__ import annotations


import pytest
from click.testing import CliRunner

from conftest import bench_module, chat_ids
from kvchat.calibration.cache import read_json
from kvchat.engine import Engine, SamplingParams
from kvchat.engine.probe import make_probe
from kvchat.methods.kvsharer import KVSharer
from kvchat.profiles import Profile

pytestmark = [pytest.mark.model]


bench = bench_module()


@pytest.fixture(scope="module")
def prompts(embedded):
    return bench.needles(embedded, 1600)  # 6 depths, the benchmark's prompts


def test_layers_0_equals_full_token_for_token(embedded):
    ids = chat_ids(embedded, "Name three colours of the rainbow.")
    full = Engine(embedded, Profile("full")).generate(ids, SamplingParams(max_new_tokens=24))
    eng = Engine(embedded, Profile("k0", methods=[KVSharer(layers=0)]))
    assert eng.aliases == {}
    assert eng.generate(ids, SamplingParams(max_new_tokens=24)).token_ids == full.token_ids


def test_calibration_is_deterministic_for_a_seed(embedded, tmp_path, monkeypatch):
    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path))
    probe = make_probe(embedded)
    m = KVSharer(layers=2, threshold=0.5, samples=2, tokens=16, seed=7)
    a, b = (read_json(m.calibrate(probe, force=True)) for _ in range(2))
    assert a["accepted"] == b["accepted"] and a["map"] == b["map"] and len(a["map"]) == 2
    assert all(0 <= src < int(layer) for layer, src in a["map"].items())


@pytest.mark.slow
def test_kvsharer_finds_the_needle_and_holds_its_share(embedded, prompts):
    r = bench.run_needles(embedded, "kvsharer", prompts)
    eng = Engine(embedded, bench.profile("kvsharer"))
    L, s = embedded.desc.n_layers, len(eng.aliases)
    assert s == eng.profile.methods[0].layers
    assert r["found"] >= 5, r
    # (L - s)/L of full, plus the owned layers' index overhead: 4-byte positions per 512 bytes of fp32
    # K/V (0.8%) and each head's last, partly filled block (< 1% at 1.6k tokens)
    assert r["held"] <= (L - s) / L * 1.02, r


@pytest.mark.slow
@pytest.mark.parametrize("name", ["kvsharer-pyramid", "kvsharer-razor"])
def test_compositions_find_the_needle(embedded, prompts, name):
    r = bench.run_needles(embedded, name, prompts)
    assert r["found"] >= 5, r
    if name == "kvsharer-pyramid":
        # Measured 46.3% (pyramid alone: ~47-50%): the 2 shared layers are ones pyramid already prunes
        # hard. The 35% needs 8 or more shared layers, which lose every needle on this 135M model
        # (benchmarks/bench_kvsharer.py sweep); this bounds a regression, it is not the target.
        assert r["held"] <= 0.48, r


def test_sharing_layers_skip_their_kv_projections(embedded):
    eng = Engine(embedded, bench.profile("kvsharer"))
    before = eng.runner.stats["kv_projections"]  # the calibration, if it ran here, used this runner
    ids = chat_ids(embedded, "What is the capital of France?")
    res = eng.generate(ids, SamplingParams(max_new_tokens=8))
    fed = len(ids) + res.completion_tokens - (res.finish_reason == "length")
    L, s = embedded.desc.n_layers, len(eng.aliases)
    assert s > 0 and eng.runner.stats["kv_projections"] - before == fed * (L - s)


def test_calibrate_command_prints_the_map(embedded, tmp_path):
    from kvchat.cli import main

    prof = tmp_path / "tiny-search.yaml"
    prof.write_text("name: tiny-search\nmethods:\n  - kvsharer: {layers: 2, samples: 2, tokens: 16}\n")
    data = tmp_path / "notes.txt"
    data.write_text("The lighthouse keeper wrote in his log every evening, and the boats stayed in. " * 20)
    out = CliRunner().invoke(main, ["calibrate", "-p", str(prof), "--data", str(data)])
    assert out.exit_code == 0, out.output
    assert "kvsharer share map for smollm2-135m-instruct: L" in out.output and "2 layers share" in out.output
