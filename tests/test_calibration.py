"""The calibration seam: the probe engines hand to methods, and the cache (JSON and tensors, atomic)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from kvchat.calibration.cache import cache_path, read_json, read_tensors, write_json, write_tensors
from kvchat.engine import Engine, Request, SamplingParams
from kvchat.engine.probe import make_probe
from kvchat.profiles import Profile


def test_tensor_cache_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path))
    path = cache_path("some/model", "cskv", {"k_density": 0.5}, suffix=".safetensors")
    assert path.suffix == ".safetensors" and path != cache_path("some/model", "cskv", {"k_density": 0.25}, ".safetensors")
    t = {"B_k": torch.randn(3, 16, 64), "layers": torch.arange(30)}
    write_tensors(path, t, {"model": "some/model", "steps": 0})
    got, meta = read_tensors(path)
    assert meta == {"model": "some/model", "steps": 0}
    assert set(got) == set(t) and all(torch.equal(got[k], t[k]) for k in t)


def test_a_crash_while_writing_leaves_no_calibration(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "c" / "x.safetensors"

    def boom(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        write_tensors(path, {"a": torch.ones(2)}, {})
    assert not path.exists() and list(path.parent.iterdir()) == []
    (path.parent / "y.safetensors").write_bytes(b"not safetensors")
    assert read_tensors(path.parent / "y.safetensors") is None
    write_json(path.parent / "z.json", {"a": 1})
    assert read_json(path.parent / "z.json") == {"a": 1} and read_json(path.parent / "nope.json") is None


def test_the_probe_runs_the_engine_loop_and_traces_each_layer():
    lm = tiny_model("llama", layers=4)
    ids = torch.randint(2, 300, (40,), generator=torch.Generator().manual_seed(0))
    probe = make_probe(lm)
    seen = {}
    logits = probe.run(ids, out="logits", rows=5, trace=lambda l, t: seen.setdefault(l, t))
    eng = Engine(lm, Profile("full"))
    seq = eng.start(Request("a", ids.tolist(), SamplingParams(max_new_tokens=1)))
    assert torch.equal(logits[-1].argmax(), torch.tensor(seq.out[0]))
    assert sorted(seen) == [0, 1, 2, 3]
    d = lm.desc
    assert seen[2]["k"].shape == (40, d.n_kv_heads, d.head_dim) and seen[2]["rows"].shape[:2] == (d.n_heads, 5)
    assert seen[2]["h"].shape == (40, d.hidden)
    shared = {}
    hidden = probe.run(ids, aliases={2: 1}, trace=lambda l, t: shared.setdefault(l, t))
    assert shared[2]["k"] is None and shared[1]["k"] is not None  # layer 2 computed Q only
    assert hidden.shape == (40, d.hidden) and not torch.allclose(hidden, probe.run(ids))
