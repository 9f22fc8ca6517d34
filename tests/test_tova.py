"""tova on a tiny random Llama: the kept tokens are the top scorers of the last query's attention, the
budget holds through decode and a second turn, `heads: layer` keeps one token set per layer."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from kvchat.engine import Engine, Request, SamplingParams
from kvchat.engine.probe import make_probe
from kvchat.errors import ProfileError
from kvchat.methods.tova import TOVA
from kvchat.profiles import Profile


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", layers=4)


def prompt(n=200, seed=1):
    return torch.randint(2, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def start(lm, m, ids, n=1):
    eng = Engine(lm, Profile("t", methods=[m]))
    return eng, eng.start(Request("t", ids, SamplingParams(max_new_tokens=n)))


@pytest.mark.parametrize("w", [1, 4])
def test_prefill_keeps_the_top_scorers_of_the_last_queries(lm, w):
    ids = prompt(200)
    rows = {}
    make_probe(lm).run(ids, rows=w, trace=lambda layer, t: rows.__setitem__(layer, t["rows"]))
    m = TOVA(ratio=0.25, min_budget=8, sink=2, obs_window=w)
    eng, _ = start(lm, m, ids)
    G = lm.desc.n_heads // lm.desc.n_kv_heads
    for layer in range(lm.desc.n_layers):
        mass = rows[layer].sum(1).view(lm.desc.n_kv_heads, G, -1).sum(1)  # (H_kv, 200)
        for h in range(lm.desc.n_kv_heads):
            s = mass[h].clone()
            s[:2] = float("inf")  # the sinks always stay
            want = torch.topk(s, 50).indices.sort().values
            got = eng.store.read(layer, 0, h).pos.long()
            assert torch.equal(got, want), (layer, h)


def test_heads_layer_keeps_one_token_set_per_layer(lm):
    eng, _ = start(lm, TOVA(ratio=0.3, min_budget=8, heads="layer"), prompt(200))
    for layer in range(lm.desc.n_layers):
        pos = [eng.store.read(layer, 0, h).pos for h in range(lm.desc.n_kv_heads)]
        assert all(torch.equal(p, pos[0]) for p in pos) and pos[0].numel() == 60
    eng2, _ = start(lm, TOVA(ratio=0.3, min_budget=8, heads="kv"), prompt(200))
    assert any(not torch.equal(eng2.store.read(l, 0, 0).pos, eng2.store.read(l, 0, 1).pos)
               for l in range(lm.desc.n_layers))  # per KV head, the heads do differ


def test_decode_holds_the_budget_and_a_second_turn_recomputes_it(lm):
    eng, seq = start(lm, TOVA(ratio=0.2, min_budget=16), prompt(200), n=60)
    while not seq.finish:
        eng.step([seq])
    B = eng.store.block_size
    for heads in eng.store.tokens_kept(0):
        assert all(40 <= n < 40 + B for n in heads), heads
    more = eng.start(Request("2", prompt(150, seed=3), SamplingParams(max_new_tokens=1)), slot=0, pos=seq.pos)
    budget = int(0.2 * (seq.pos + 150))
    assert eng.store.seen[0] == seq.pos + 150 and more.finish
    for heads in eng.store.tokens_kept(0):
        assert heads == [budget] * lm.desc.n_kv_heads


def test_a_short_prompt_keeps_everything(lm):
    ids = prompt(60)
    full = Engine(lm, Profile("full")).generate(ids, SamplingParams(max_new_tokens=8))
    eng = Engine(lm, Profile("t", methods=[TOVA(ratio=0.1, min_budget=128)]))
    assert eng.generate(ids, SamplingParams(max_new_tokens=8)).token_ids == full.token_ids


@pytest.mark.parametrize("params, msg", [({"ratio": 0}, "tova.ratio must be > 0.0, got 0"),
                                         ({"heads": "mean"}, "tova.heads must be kv or layer, got 'mean'"),
                                         ({"obs_window": 0}, "tova.obs_window must be >= 1, got 0")])
def test_bad_parameters(params, msg):
    with pytest.raises(ProfileError, match=msg):
        TOVA(**params)
