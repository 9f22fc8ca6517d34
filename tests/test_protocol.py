"""The cache protocol: every registered method in one matrix, compositions, formats, layouts, statistics.

Runs on tiny random models (seconds); tests/test_protocol_model.py repeats the composition checks on
the embedded SmolLM2.
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

ROLES = ("policy", "format", "layout")
# A compressing instance of every policy, sized for the tiny model. The matrix below fails when a
# registered policy has no entry here: a new method comes with its place in the matrix.
COMPRESSING = {
    "window": lambda: Window(sink=4, recent=40),
    "pyramidinfer": lambda: PyramidInfer(recent_ratio=0.1, decay=0.5, min_context=16, gen_block=8),
    "razor": lambda: RazorAttention(sink=2, recent=24, window_ratio=0.0, echo_ratio=0.1, induction_ratio=0.2,
                                    calib_tokens=16, calib_repeats=2),
    "d2o": lambda: D2O(ratio=0.3, min_budget=24, obs_window=8),
    "tova": lambda: TOVA(ratio=0.3, min_budget=24),
}
FORMATS = {"half": lambda: Half(residual=8, group=8), "kivi": lambda: Kivi(bits=4, group=8, residual=8),
           "kvquant": lambda: KVQuant(bits=4, group=8, block=8),
           "cskv": lambda: CSKV(k_density=0.5, v_density=0.25, window=8, group=8, calib_samples=2,
                                calib_tokens=64, train_steps=0),
           # a variant of a method is "name:variant": its features quantized (profile cskv-kivi4)
           "cskv:kivi4": lambda: CSKV(k_density=0.5, v_density=0.5, window=8, group=8, calib_samples=2,
                                      calib_tokens=64, train_steps=0, bits=4, qgroup=4)}
# Layouts: threshold -1 accepts every share the search tries, so exactly `layers` layers share.
LAYOUTS = {"kvsharer": lambda: KVSharer(layers=2, threshold=-1.0, samples=2, tokens=24)}


def by_role(role: str) -> list[str]:
    return sorted(n for n, cls in REGISTRY.items() if cls.role == role)


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", layers=6)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path))  # razor's calibration cache
    return tmp_path


def prompt(n=200, seed=1):
    return torch.randint(2, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def generate(lm, methods, ids, n=24):
    """Greedy generation of n tokens; the slot stays live so its store can be compared."""
    eng = Engine(lm, Profile("t", methods=methods))
    seq = eng.start(Request("t", ids, SamplingParams(max_new_tokens=n)))
    while not seq.finish:
        eng.step([seq])
    kept = eng.store.tokens_kept(seq.slot)
    assert sum(map(sum, kept)) > 0
    return eng.result(seq), eng


def check_consistent(eng: Engine, slots) -> None:
    """After a step: every method's per-token state has the store's length per (slot, layer, head),
    positions strictly increase along every head, and bytes held are the storage referenced."""
    st = eng.store
    for slot in slots:
        for layer in st.owned_layers():
            lens = list(st.lengths(layer, slot))
            st.format(layer).check(slot)
            for m in eng.methods:
                have = m.state_lengths(layer, slot)
                assert have is None or have == lens, (m.name, layer, slot, have, lens)
    assert st.bytes_held() == sum(f.storage_bytes() for f in st.owned())


def run_checked(lm, methods, prompts, steps=30, turns=1):
    """Prompts in parallel slots, `steps` greedy decode steps, consistency checked after every step;
    a second turn on slot 0 when `turns` is 2. -> the engine."""
    eng = Engine(lm, Profile("t", methods=methods), max_slots=len(prompts))
    seqs = [eng.start(Request(str(i), ids, SamplingParams(max_new_tokens=steps + 1))) for i, ids in enumerate(prompts)]
    check_consistent(eng, range(len(prompts)))
    for _ in range(steps):
        live = [s for s in seqs if not s.finish]
        if not live:
            break
        eng.step(live)
        check_consistent(eng, [s.slot for s in live])
    if turns == 2:
        seq = eng.start(Request("t2", prompt(60, seed=9), SamplingParams(max_new_tokens=8)), slot=0, pos=seqs[0].pos)
        check_consistent(eng, [0])
        while not seq.finish:
            eng.step([seq])
            check_consistent(eng, [0])
    return eng


# ---- the registry-driven matrix ------------------------------------------------------------------------
def test_every_method_has_a_role_and_keep_all_settings():
    assert set(COMPRESSING) == set(by_role("policy")), "every policy needs a compressing instance here"
    assert {f.split(":")[0] for f in FORMATS} == set(by_role("format")), "every format needs an instance here"
    assert set(LAYOUTS) == set(by_role("layout")), "every layout needs an instance here"
    for name, cls in REGISTRY.items():
        assert cls.role in ROLES, name
        assert isinstance(cls.keep_all(), cls), name


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_keep_all_equals_full(lm, home, name):
    ids = prompt()
    full, feng = generate(lm, [], ids)
    got, eng = generate(lm, [REGISTRY[name].keep_all()], ids)
    assert got.token_ids == full.token_ids
    assert eng.store.tokens_kept(0) == feng.store.tokens_kept(0)


@pytest.mark.parametrize("a,b", list(itertools.permutations(sorted(COMPRESSING), 2))
                         + [(a, lay) for a in sorted(COMPRESSING) for lay in sorted(LAYOUTS)])
def test_policy_next_to_keep_all_other_equals_policy_alone(lm, home, a, b):
    ids = prompt()
    alone, eng = generate(lm, [COMPRESSING[a]()], ids)
    for methods in ([COMPRESSING[a](), REGISTRY[b].keep_all()], [REGISTRY[b].keep_all(), COMPRESSING[a]()]):
        got, eng2 = generate(lm, methods, ids)
        assert got.token_ids == alone.token_ids, [m.name for m in methods]
        assert eng2.store.tokens_kept(0) == eng.store.tokens_kept(0), [m.name for m in methods]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("pol", sorted(COMPRESSING))
def test_policy_over_format_equals_policy_when_the_format_keeps_all(lm, home, pol, fmt):
    ids = prompt()
    alone, eng = generate(lm, [COMPRESSING[pol]()], ids)
    got, eng2 = generate(lm, [COMPRESSING[pol](), REGISTRY[fmt.split(":")[0]].keep_all()], ids)
    assert got.token_ids == alone.token_ids and eng2.store.tokens_kept(0) == eng.store.tokens_kept(0)


COMPOSITIONS = ([[a, b] for a, b in itertools.permutations(sorted(COMPRESSING), 2)]
                + [[p, f] for p in sorted(COMPRESSING) for f in sorted(FORMATS)]
                + [["razor", "d2o", "half"], ["pyramidinfer", "window", "half"]]
                + [[lay, x] for lay in sorted(LAYOUTS) for x in sorted(COMPRESSING) + sorted(FORMATS)]
                + [[lay, "razor", "half"] for lay in sorted(LAYOUTS)])


@pytest.mark.parametrize("names", COMPOSITIONS, ids=["+".join(c) for c in COMPOSITIONS])
def test_compositions_keep_every_state_in_step(lm, home, names):
    make = {**COMPRESSING, **FORMATS, **LAYOUTS}
    eng = run_checked(lm, [make[n]() for n in names], [prompt(200), prompt(150, seed=2)], steps=30, turns=2)
    full = eng.store.bytes_full()
    assert eng.store.bytes_held() < full  # they compress, and every step above kept them consistent
    if any(n in LAYOUTS for n in names):  # the layout's sharing layers read another's store, own nothing
        assert len(eng.store.aliases) == 2 and len(eng.store.owned()) == lm.desc.n_layers - 2


# ---- formats -------------------------------------------------------------------------------------------
