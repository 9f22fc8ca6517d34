"""The engine with every kernel forced to Triton (the interpreter on CPU) equals the torch references."""

from __future__ import annotations

import pytest

from conftest import tiny_model
from kvchat.engine import Engine, Request, SamplingParams
from kvchat.methods.window import Window
from kvchat.profiles import Profile

pytest.importorskip("triton")


@pytest.mark.parametrize("profile", [Profile("full"), Profile("window", methods=[Window(sink=2, recent=12)])],
                         ids=["full", "window"])
def test_triton_engine_matches_reference(monkeypatch, profile):
    lm = tiny_model("llama")
    prompts = [list(range(3, 30)), list(range(40, 49))]

    def run(impl):
        monkeypatch.setenv("KVCHAT_KERNELS", impl)
        eng = Engine(lm, profile, max_slots=2, block_size=8, prefill_chunk=10)
        reqs = [Request(str(i), p, SamplingParams(max_new_tokens=20)) for i, p in enumerate(prompts)]
        return {r.id: r.token_ids for r in eng.run(reqs)}

    ref = run("ref")
    tri = run("triton")
    assert tri == ref
