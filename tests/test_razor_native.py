"""RazorAttention's native fold (`RazorAttention._fold_native`: kernels/cpu_evict.c's merge and compaction
with a weight per head) against the torch path it replaces, and the decode-time fold schedule
(`_wait`) against checking every layer every step: the same tokens, the same store bytes, the same folds."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from kvchat_kernels import cpu, cpu_evict
from kvchat.engine import Engine, Request, SamplingParams
from kvchat.methods.razor import RazorAttention
from kvchat.profiles import Profile

pytestmark = pytest.mark.skipif(not cpu.enabled(), reason="the native CPU ops are not built here")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path))
    return tmp_path


def ids(n, seed):
    return torch.randint(2, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def razor():
    # 2 of the 12 KV heads are retrieval heads: folds cover a subset of a layer's heads
    return RazorAttention(sink=3, recent=32, window_ratio=0.0, echo_ratio=0.1, induction_ratio=0.1,
                          calib_tokens=16, calib_repeats=2)


def generate(lm, native: bool, monkeypatch, check_every_step=False, n=70):
    """Two slots of different prompts decode n tokens, then slot 0 takes a second turn and decodes n more;
    -> (tokens, every (layer, slot, head)'s stored tokens, native fold calls, the folds in order)."""
    calls, folds = [], []
    with monkeypatch.context() as m:
        m.setattr(cpu_evict, "ok", lambda *a: native)
        fn, fold = RazorAttention._fold_native, RazorAttention._fold
        m.setattr(RazorAttention, "_fold_native", lambda self, *a: (calls.append(a[1]), fn(self, *a))[1])
        m.setattr(RazorAttention, "_fold", lambda self, store, slot, layer: (
            folds.append((sum(store.seen), slot, layer)), fold(self, store, slot, layer))[1])
        if check_every_step:  # the schedule off: every layer of every slot looked at after every step
            after = RazorAttention.after_decode

            def every_step(self, store, slots):
                for s in slots:
                    self._wait[s] = [0] * len(self._wait[s])
                after(self, store, slots)
            m.setattr(RazorAttention, "after_decode", every_step)
        eng = Engine(lm, Profile("t", methods=[razor()]), block_size=16, max_slots=2)
        seqs = [eng.start(Request(str(i), ids(200 + 50 * i, i), SamplingParams(max_new_tokens=n))) for i in range(2)]
        while any(s.finish is None for s in seqs):
            eng.step([s for s in seqs if s.finish is None])
        toks = [eng.result(s).token_ids for s in seqs]
        turn = eng.start(Request("2", ids(90, 7), SamplingParams(max_new_tokens=n)), slot=seqs[0].slot,
                         pos=seqs[0].pos)
        while turn.finish is None:
            eng.step([turn])
        toks.append(eng.result(turn).token_ids)
        store = {(l, s, h): eng.store.read(l, s, h) for l in range(lm.desc.n_layers) for s in range(2)
                 for h in range(lm.desc.n_kv_heads)}
    return toks, store, calls, folds


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_fold_generates_and_stores_what_the_torch_path_does(dtype, home, monkeypatch):
    lm = tiny_llama(dtype)
    a = generate(lm, True, monkeypatch)
    b = generate(lm, False, monkeypatch)
    assert len(a[2]) > 20 and not b[2]  # folds ran natively (prefill, decode, the second turn); never on torch
    assert a[0] == b[0] and a[3] == b[3]
    for key, ta in a[1].items():
        tb = b[1][key]
        for x, y in zip(ta, tb):
            assert (x is None and y is None) or torch.equal(x, y), key


def test_fold_schedule_folds_what_checking_every_step_folds(home, monkeypatch):
    lm = tiny_llama(torch.float32)
    a = generate(lm, True, monkeypatch)
    b = generate(lm, True, monkeypatch, check_every_step=True)
    decode_folds = [f for f in a[3] if f[0] > 450]  # past the two prompts' prefills
    assert len(decode_folds) > 10
    assert a[3] == b[3] and a[0] == b[0]
