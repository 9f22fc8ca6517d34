"""kernels/cpu_layer.c's whole-layer decode call: the per-op native calls' results bit for bit, alone
(against those calls on a paged store) and in the engine (every method of the registry, and formats
the call does not take next to those it does)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import pytest
import torch

from conftest import tiny_model
from kvchat_kernels import cpu, cpu_layer
from kvchat.engine import Engine, Request, SamplingParams
from kvchat.engine.forward import Runner
from kvchat.methods.window import Window
from kvchat.model import LoadedModel, describe
from kvchat.profiles import Profile
from test_protocol import COMPRESSING, FORMATS, LAYOUTS

if not cpu.available():  # the native library must build here (test_kernels_meta asserts it)
    pytest.fail(f"kvchat's native CPU ops did not build: {cpu.status()}", pytrace=False)


def close_weights(n, k, dtype, g):
    return (torch.randn(n, k, generator=g) / k**0.5).to(dtype)


def paged(B, Hkv, D, bs, lens, dtype, g, with_bias):
    """A paged store of B slots x Hkv heads holding `lens[b][h]` tokens, each head's blocks scattered
    over the pool -> pools, table, flat rows of one more token per head (as step_rows gives them)."""
    per = [[-(-(n + 1) // bs) for n in row] for row in lens]
    n_blocks = sum(map(sum, per)) + 3
    ids = torch.randperm(n_blocks, generator=g).tolist()
    MB = max(map(max, per)) + 1
    table = torch.zeros(B, Hkv, MB, dtype=torch.int32)
    rows = []
    for b in range(B):
        for h in range(Hkv):
            blocks = [ids.pop() for _ in range(per[b][h])]
            table[b, h, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            n = lens[b][h]
            rows.append(blocks[n // bs] * bs + n % bs)
    k = torch.randn(n_blocks, bs, D, generator=g).to(dtype)
    v = torch.randn(n_blocks, bs, D, generator=g).to(dtype)
    pos = torch.randint(0, 1000, (n_blocks, bs), generator=g, dtype=torch.int32)
    bias = torch.randn(n_blocks, bs, generator=g) if with_bias else None
    lengths = torch.tensor([[n + 1 for n in row] for row in lens], dtype=torch.int32)
    return k, v, pos, bias, table, rows, lengths


@pytest.fixture(params=[True, False], ids=["amx", "vectors"])
def matmul_path(request):
    before = cpu.amx()
    cpu.set_amx(request.param)
    yield
    cpu.set_amx(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 32])
@pytest.mark.parametrize("B, lens", [(1, [[37, 37]]), (3, [[5, 40], [17, 17], [0, 63]])], ids=["one", "ragged"])
@pytest.mark.parametrize("owns", [True, False], ids=["owns", "reads"])
@pytest.mark.parametrize("extras", [(False, False, False), (True, True, False), (False, True, True)],
                         ids=["plain", "bias+colsum", "colsum_into"])
def test_decode_layer_is_the_per_op_calls_bit_for_bit(matmul_path, dtype, D, B, lens, owns, extras):
    """colsum_into: the column sums added into running scores (n_slots, Hkv, cap) at rows given out of
    order, as d2o's buffer takes them, instead of returned."""
    if not cpu.linear_ok(dtype):
        pytest.fail(f"this machine runs the native {dtype} matmul (AVX-512, AVX512-BF16): {cpu.status()}")
    with_bias, want_colsum, into = extras
    g = torch.Generator().manual_seed(7)
    Hq, Hkv, hidden, inter, bs = 4, 2, 128, 96, 16
    nq, nk = Hq * D, Hkv * D
    w_qkv = close_weights(nq + 2 * nk, hidden, dtype, g)
    b_in = torch.randn(nq + 2 * nk, generator=g).to(dtype)
    w_o, w_gu, w_dn = close_weights(hidden, nq, dtype, g), close_weights(2 * inter, hidden, dtype, g), \
        close_weights(hidden, inter, dtype, g)
    post_w, next_w = torch.rand(hidden, generator=g).to(dtype) + 0.5, torch.rand(hidden, generator=g).to(dtype) + 0.5
    x0 = torch.randn(B, hidden, generator=g).to(dtype)
    h0 = torch.randn(B, hidden, generator=g).to(dtype)
    cos = torch.randn(B, 1, D, generator=g).to(dtype)
    sin = torch.randn(B, 1, D, generator=g).to(dtype)
    positions = torch.randint(0, 1000, (B,), generator=g, dtype=torch.int32)
    k, v, pos, bias, table, rows, lengths = paged(B, Hkv, D, bs, lens, dtype, g, with_bias)
    if not owns:  # a layer reading another layer's store: nothing appended, the lengths as they are
        lengths -= 1
    mx, mn = int(lengths.max()), int(lengths.min())
    w_in, bi = (w_qkv, b_in) if owns else (w_qkv[:nq], b_in[:nq])

    # the per-op calls, as forward.py's `_decode_native` makes them
    rk, rv, rpos, rbias = k.clone(), v.clone(), pos.clone(), None if bias is None else bias.clone()
    x_ref = x0.clone()
    inp = cpu.linear(h0, w_in, bi)
    heads = Hq + Hkv if owns else Hq
    qk = cpu.rope(inp, heads, D, cos, sin)
    if owns:
        flat = cpu.rows_array(rows)
        cpu.scatter_rows(rk, qk[:, Hq:], flat)
        cpu.scatter_rows(rv, inp[:, nq + nk :].view(B, Hkv, D), flat)
        cpu.scatter_rows(rpos, positions.view(B, 1).expand(B, Hkv), flat)
        if rbias is not None:
            cpu.scatter_rows(rbias, torch.zeros(()).expand(B, Hkv), flat)
    res = cpu.decode_attention(qk[:, :Hq], rk, rv, table, lengths, 0.125, rbias, want_colsum, max_len=mx, min_len=mn)
    attn, cs_ref = res if want_colsum else (res, None)
    scores = scores_ref = slot_rows = None
    if into:  # B of n_slots = B + 1 rows, reversed; cap cuts the longest head's last tokens
        slot_rows = torch.arange(B, 0, -1, dtype=torch.int64)
        scores = torch.rand(B + 1, Hkv, mx - 2, generator=g)
        scores_ref = scores.clone()
        scores_ref[slot_rows] += cs_ref[:, :, : mx - 2]
    x_ref, h_ref = cpu.add_rms_norm(x_ref, cpu.linear(attn.reshape(B, -1), w_o), post_w, 1e-5)
    x_ref, h_ref = cpu.add_rms_norm(x_ref, cpu.linear(cpu.silu_mul(cpu.linear(h_ref, w_gu)), w_dn), next_w, 1e-6)

    layer = cpu_layer.DecodeLayer(w_in, bi, w_o, None, w_gu, None, w_dn, None, post_w, 1e-5, next_w, 1e-6, Hq, Hkv, D, owns)
    scratch = cpu_layer.Scratch()
    x, h = x0.clone(), h0.clone()
    cs = layer(x, h, scratch, cos, sin, k, v, pos, bias, cpu.rows_array(rows) if owns else None, positions,
               table, lengths, mx, mn, 0.125, want_colsum, scores, slot_rows)
    assert torch.equal(x, x_ref) and torch.equal(h, h_ref)
    assert torch.equal(k, rk) and torch.equal(v, rv) and torch.equal(pos, rpos)
    assert bias is None or torch.equal(bias, rbias)
    if into:
        assert cs is None and torch.equal(scores, scores_ref)
    else:
        assert (cs is None) == (not want_colsum) and (cs is None or torch.equal(cs, cs_ref))
    if owns:  # the append happened: the new rows hold this step's keys and positions
        assert torch.equal(k.view(-1, D)[rows], qk[:, Hq:].reshape(-1, D))
        assert pos.view(-1)[rows].tolist() == positions.repeat_interleave(Hkv).tolist()


# ---- in the engine -----------------------------------------------------------------------------------

def bf16_model(arch="llama", layers=6):
    lm = tiny_model(arch, layers=layers)
    hf = lm.hf.to(torch.bfloat16)
    return LoadedModel(hf=hf, tokenizer=lm.tokenizer, desc=describe(hf, lm.desc.name), eos_ids=frozenset())


def decode_run(lm, methods, prompts, steps, monkeypatch, fused: bool):
    """Greedy decode of `prompts` in parallel slots -> (tokens per request, every step's logits, the
    number of layers of each native call)."""
    monkeypatch.setenv("KVCHAT_FUSED_LAYER", "1" if fused else "0")
    calls, logits = [], []
    real_run, real_decode = cpu_layer.run, Runner.decode

    def counted(layers, *a, **k):
        calls.append(len(layers))
        return real_run(layers, *a, **k)

    def recorded(self, *a, **k):
        out = real_decode(self, *a, **k)
        logits.append(out.clone())
        return out

    monkeypatch.setattr(cpu_layer, "run", counted)
    monkeypatch.setattr(Runner, "decode", recorded)
    eng = Engine(lm, Profile("t", methods=methods), max_slots=len(prompts), block_size=8)
    assert eng.runner.fused == fused
    reqs = [Request(str(i), p, SamplingParams(max_new_tokens=steps)) for i, p in enumerate(prompts)]
    out = {r.id: r.token_ids for r in eng.run(reqs)}
    monkeypatch.undo()
    return out, logits, calls


def prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(2, 300, (n,), generator=g).tolist() for n in (150, 61)]


CASES = ({"full": lambda: []}
         | {name: (lambda make=make: [make()]) for name, make in COMPRESSING.items()}
         | {name: (lambda make=make: [make()]) for name, make in (FORMATS | LAYOUTS).items()}
         | {"d2o+kvsharer": lambda: [COMPRESSING["d2o"](), LAYOUTS["kvsharer"]()],
            "razor+kivi": lambda: [COMPRESSING["razor"](), FORMATS["kivi"]()],
            "window+half": lambda: [COMPRESSING["window"](), FORMATS["half"]()]})


@pytest.fixture(scope="module")
def models():
    return {torch.float32: tiny_model("llama", layers=6), torch.bfloat16: bf16_model()}


# half stores float16 under a float32 model only (under bfloat16 it is a profile error)
RUNS = [(c, d) for c in sorted(CASES) for d in ("f32", "bf16") if not ("half" in c and d == "bf16")]


@pytest.mark.parametrize("case, dtype", RUNS)
def test_the_engine_decodes_the_same_with_whole_layer_calls(models, tmp_path, monkeypatch, case, dtype):
    """Every registered method (a compressing instance of each policy, each format, the layout) and a few
    compositions: the same tokens and the same logits, bit for bit, with the layer call on and off; the
    call ran wherever the store is dense in the model's dtype."""
    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path))  # calibrations of this test's own
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
    lm = models[dtype]
    want, want_logits, n_off = decode_run(lm, CASES[case](), prompts(), 12, monkeypatch, fused=False)
    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path))
    got, got_logits, n_on = decode_run(lm, CASES[case](), prompts(), 12, monkeypatch, fused=True)
    assert got == want
    assert len(got_logits) == len(want_logits) and all(torch.equal(a, b) for a, b in zip(got_logits, want_logits))
    assert n_off == []
    dense = case not in ("kivi", "kvquant", "cskv", "cskv:kivi4", "razor+kivi") and not (
        case in ("half", "window+half") and dtype == torch.float32)  # a 16-bit store under float32
    assert (len(n_on) > 0) == dense, (case, n_on)
    n = lm.desc.n_layers
    if case in ("full", "razor", "window", "d2o", "pyramidinfer", "tova"):  # hooks on their own layer only
        assert set(n_on) == {n}, n_on  # the whole stack in one call
    if case == "d2o+kvsharer":  # d2o evicts from a store a later layer reads: that layer ends a run
        assert max(n_on) < n and sum(n_on) % n == 0, n_on


@dataclass
class Watcher(Window):
    """A window whose per-layer hook records which layers of the step had computed when it ran (the
    engine copies its methods: `seen` is the caller's list)."""

    seen: list = field(default_factory=list)
    barrier: bool = True

    def after_decode_layer(self, ctx) -> None:
        self.seen.append((ctx.layer, sorted(ctx.store.stats)))

    def decode_barrier(self, layer: int) -> bool:
        return self.barrier


def test_a_hook_runs_before_the_next_layer_computes_unless_the_method_says_it_need_not(models, monkeypatch):
    """`Method.decode_barrier`: by default a method with a per-layer hook sees layer l's hook before layer
    l + 1 computes (one layer per native call); saying it needs no barrier lets the layers run as one
    call, the hooks after it, still in layer order."""
    lm, n = models[torch.float32], models[torch.float32].desc.n_layers
    for barrier in (True, False):
        seen = []
        _, _, calls = decode_run(lm, [Watcher(sink=2, recent=40, seen=seen, barrier=barrier)], prompts()[:1], 3,
                                 monkeypatch, fused=True)
        assert set(calls) == ({1} if barrier else {n}), calls
        assert len(seen) == 2 * n  # two decode steps (the first token comes from the prefill)
        done = [list(range(li + 1)) if barrier else list(range(n)) for li in range(n)]
        assert seen[:n] == [(li, d) for li, d in zip(range(n), done)]
