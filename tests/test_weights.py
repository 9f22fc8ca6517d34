"""The runner's weight layouts: packed bfloat16 projections compute what F.linear computes, once per model."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from kvchat.engine import Engine, Request, SamplingParams
from kvchat.engine.weights import Weights, choose_layout, packing_works
from kvchat.methods.base import Method
from kvchat.methods.kvsharer import KVSharer
from kvchat.methods.window import Window
from kvchat.model import LoadedModel, describe
from kvchat.profiles import Profile


def bf16_model(arch: str = "llama") -> LoadedModel:
    lm = tiny_model(arch)
    hf = lm.hf.to(torch.bfloat16)
    return LoadedModel(hf=hf, tokenizer=lm.tokenizer, desc=describe(hf, lm.desc.name), eos_ids=frozenset())


def tokens(lm, profile, prompts, steps=24):
    eng = Engine(lm, profile, max_slots=len(prompts))
    reqs = [Request(str(i), p, SamplingParams(max_new_tokens=steps)) for i, p in enumerate(prompts)]
    return {r.id: r.token_ids for r in eng.run(reqs)}, eng


def test_bfloat16_layout_is_packed_where_onednn_computes_it(monkeypatch):
    want = "packed" if packing_works() else "rows"
    assert choose_layout(torch.bfloat16, torch.device("cpu"), 1) == want
    monkeypatch.setenv("KVCHAT_PACK", "0")
    assert choose_layout(torch.bfloat16, torch.device("cpu"), 1) == "rows"
    assert choose_layout(torch.float32, torch.device("cpu"), 1) == "transposed"
    assert choose_layout(torch.float32, torch.device("cpu"), 8) == "rows"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])  # qwen2: Q/K/V biases; qwen3: q/k norms
def test_packed_weights_give_the_plain_layouts_logits_and_tokens(monkeypatch, arch):
    prompts = [list(range(3, 40)), list(range(50, 61))]
    profile = Profile("window", methods=[Window(sink=2, recent=16)])
    monkeypatch.setenv("KVCHAT_PACK", "0")
    plain_lm = bf16_model(arch)
    want, plain = tokens(plain_lm, profile, prompts)
    monkeypatch.delenv("KVCHAT_PACK")
    packed_lm = bf16_model(arch)
    got, packed = tokens(packed_lm, profile, prompts)
    assert plain.runner.weights.layout == "rows"
    assert packed.runner.weights.layout == ("packed" if packing_works() else "rows")
    assert got == want
    ids = torch.tensor(prompts[0])
    pos = torch.arange(len(prompts[0]))
    a = plain.runner.prefill(plain.store, 0, ids, pos, out="logits")
    b = packed.runner.prefill(packed.store, 0, ids, pos, out="logits")
    assert torch.allclose(a, b, atol=1e-2, rtol=1e-2), (a - b).abs().max()


class FixedShare(KVSharer):
    """KVSharer's layout with a given share map instead of a calibrated one."""

    def bind(self, desc, probe=None) -> None:
        Method.bind(self, desc, probe)
        self.share = {2: 0}


def test_a_layer_reading_another_layers_store_gets_its_q_rows_from_packed_weights(monkeypatch):
    """KVSharer's sharing layers compute Q only: from packed Q/K/V, the Q rows are recovered exactly."""
    prompts = [list(range(3, 30))]
    share = Profile("kvsharer", methods=[FixedShare(layers=1)])
    monkeypatch.setenv("KVCHAT_PACK", "0")
    want, plain = tokens(bf16_model(), share, prompts)
    monkeypatch.delenv("KVCHAT_PACK")
    got, packed = tokens(bf16_model(), share, prompts)
    assert got == want
    assert packed.store.aliases == {2: 0}
    if packing_works():
        lw = packed.runner.weights.layers[2]
        assert lw.q.built.packed and lw.q.built.w.shape == (lw.q.n_q, plain.desc.hidden)


def test_the_layout_is_built_once_per_model_and_hf_forward_then_says_why_it_cannot_run():
    lm = bf16_model()
    w1 = Weights.of(lm, 1)
    assert Weights.of(lm, 8) is w1  # bfloat16 has one layout at every batch size
    if w1.layout == "packed":
        with pytest.raises(RuntimeError, match="packed for kvchat's runner"):
            lm.hf(torch.tensor([[1, 2, 3]]))
