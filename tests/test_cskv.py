"""cskv on tiny random models: what a sealed token holds, attention over features, positions, bytes, and
the calibration (deterministic, cached per model and parameters, on the chosen text).

The registry matrix (tests/test_protocol.py) runs cskv next to every policy; tests/test_cskv_model.py
checks it on the embedded SmolLM2."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from kvchat.calibration import calibrate
from kvchat.calibration.cache import cache_path, read_tensors
from kvchat.cache.attention import causal_attention
from kvchat.engine import Engine, Request, SamplingParams
from kvchat.engine.probe import make_probe
from kvchat.errors import ProfileError
from kvchat.methods.cskv import CSKV, CSKVFormat, Rope
from kvchat.methods.window import Window
from kvchat.profiles import Profile

CAL = dict(calib_samples=2, calib_tokens=64, train_steps=0)


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", layers=3)


def random_factors(H: int, D: int, r_k: int, r_v: int, seed: int = 0) -> dict:
    """Orthonormal directions and a mean per head, different for every head."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, r in (("k", r_k), ("v", r_v)):
        P = torch.linalg.qr(torch.randn(H, D, D, generator=g))[0][..., :r]
        out.update({f"{n}_mu": torch.randn(H, D, generator=g), f"{n}_down": P, f"{n}_up": P.transpose(-1, -2).contiguous()})
    return out


def fmt_with(lm, fac: dict, group=4, window=3, pinned=0) -> CSKVFormat:
    d = lm.desc
    rope = Rope(make_probe(lm).rope_tables, d.dtype, d.device)
    return CSKVFormat(1, d.n_kv_heads, d.head_dim, 4, d.dtype, d.device, factors=fac, rope=rope, group=group,
                      residual=window, pinned=pinned)


def fill(fmt: CSKVFormat, T: int, seed: int = 1):
    """Append T random tokens (keys rotated by the format's own RoPE) and seal; -> k_pre, k, v (T, H, D)."""
    g = torch.Generator().manual_seed(seed)
    H, D = fmt.n_kv, fmt.head_dim
    k_pre, v = torch.randn(T, H, D, generator=g), torch.randn(T, H, D, generator=g)
    pos = torch.arange(T)
    k = fmt.rope.rotate(k_pre, pos.view(T, 1).expand(T, H))
    fmt.append_chunk(0, k_pre, k, v, pos)
    fmt.seal([0])
    return k_pre, k, v


def test_a_sealed_token_holds_its_features_and_reads_back_its_reconstruction(lm):
    """Keys before RoPE are projected with their own head's factors; a read rebuilds and re-rotates."""
    d = lm.desc
    D, H = d.head_dim, d.n_kv_heads
    fac = random_factors(H, D, 6, 4)
    fmt = fmt_with(lm, fac, pinned=2)
    T = 23
    k_pre, k, v = fill(fmt, T)
    n_sealed = (T - 2 - 3) // 4 * 4
    assert fmt.n_sealed(0, 0) == n_sealed and fmt.tail.host[0] == [T - n_sealed] * H
    for h in range(H):
        t = fmt.read(0, h)
        assert t.pos.tolist() == list(range(T))
        s = torch.arange(2, 2 + n_sealed)
        rec = lambda x, n: fac[f"{n}_mu"][h] + (x - fac[f"{n}_mu"][h]) @ fac[f"{n}_down"][h] @ fac[f"{n}_up"][h]  # noqa: E731
        want_k = fmt.rope.rotate(rec(k_pre[s, h], "k"), s)
        assert torch.allclose(t.k[s], want_k, atol=1e-4) and torch.allclose(t.v[s], rec(v[s, h], "v"), atol=1e-4)
        assert not torch.allclose(t.k[s], k[s, h], atol=1e-2)  # rank 6 of 16 does lose something
        rest = torch.cat([torch.arange(2), torch.arange(2 + n_sealed, T)])  # sinks and window: untouched
        assert torch.equal(t.k[rest], k[rest, h]) and torch.equal(t.v[rest], v[rest, h])


def test_full_rank_factors_are_lossless_up_to_rounding(lm):
    d = lm.desc
    fmt = fmt_with(lm, random_factors(d.n_kv_heads, d.head_dim, d.head_dim, d.head_dim))
    _, k, v = fill(fmt, 30)
    for h in range(d.n_kv_heads):
        t = fmt.read(0, h)
        assert torch.allclose(t.k, k[:, h], atol=1e-5) and torch.allclose(t.v, v[:, h], atol=1e-5)


def reference(q, toks, scale, q_pos=None):
    """Softmax attention of q (n, G, D) over one head's tokens (read back), causal by position if q_pos."""
    s = torch.einsum("ngd,td->ngt", q, toks.k) * scale
    if q_pos is not None:
        s = s.masked_fill(toks.pos.view(1, 1, -1) > q_pos.view(-1, 1, 1), float("-inf"))
    p = torch.softmax(s, -1)
    return torch.einsum("ngt,td->ngd", p, toks.v), p


def test_decode_attention_over_features_equals_attention_over_the_reconstruction(lm):
    """Keys rebuilt in interleaved order and rotated as complex pairs, values summed over features and
    lifted once: the same output and column sums as plain attention over what `read` returns."""
    d = lm.desc
    H, D, G = d.n_kv_heads, d.head_dim, d.n_heads // d.n_kv_heads
    fmt = fmt_with(lm, random_factors(H, D, 6, 4), pinned=1)
    fmt.chunk_groups = 2  # several chunks merged
    fill(fmt, 40)
    q = torch.randn(1, H * G, D, generator=torch.Generator().manual_seed(3))
    out, col = fmt.attend_decode(q, [0], torch.tensor([0]), 0.3, colsum=True)
    for h in range(H):
        want, p = reference(q[:, h * G : (h + 1) * G], fmt.read(0, h), 0.3)
        assert torch.allclose(out[0, h * G : (h + 1) * G], want[0], atol=1e-5)
        assert torch.allclose(col[0, h, :40], p[0].sum(0), atol=1e-5)


def test_a_later_chunk_attends_to_features_and_its_own_full_keys(lm):
    d = lm.desc
    H, D, G = d.n_kv_heads, d.head_dim, d.n_heads // d.n_kv_heads
    fmt = fmt_with(lm, random_factors(H, D, 6, 4))
    fill(fmt, 30)
    g = torch.Generator().manual_seed(4)
    T2, pos = 5, torch.arange(30, 35)
    k_pre, v = torch.randn(T2, H, D, generator=g), torch.randn(T2, H, D, generator=g)
    fmt.append_chunk(0, k_pre, fmt.rope.rotate(k_pre, pos.view(-1, 1).expand(T2, H)), v, pos)
    q = torch.randn(T2, H * G, D, generator=g)
    out, rows = fmt.attend_prefill(q, 0, pos, 0.3, last_w=2)
    for h in range(H):
        want, p = reference(q[:, h * G : (h + 1) * G], fmt.read(0, h), 0.3, q_pos=pos)
        assert torch.allclose(out[:, h * G : (h + 1) * G], want, atol=1e-5)
        assert torch.allclose(rows[h * G : (h + 1) * G], p[-2:].transpose(0, 1), atol=1e-5)


def test_the_prompt_attends_to_its_own_full_keys_and_is_sealed_after(lm, tmp_path, monkeypatch):
    """Prefill logits equal full's exactly (the chunk sits in the tail while it attends); once the prefill
    is done, everything but the window is features."""
    from kvchat.engine.generate import Seq

    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path))
    ids = torch.randint(2, 300, (120,), generator=torch.Generator().manual_seed(0)).tolist()
    logits = {}
    for name, methods in (("full", []), ("cskv", [CSKV(k_density=0.25, v_density=0.25, window=4, group=4, **CAL)])):
        eng = Engine(lm, Profile(name, methods=methods))
        logits[name] = eng.prefill(Seq(Request(name, ids, SamplingParams()), slot=0), ids)
    assert torch.equal(logits["cskv"], logits["full"])
    for l in range(lm.desc.n_layers):
        fmt = eng.store.format(l)
        assert fmt.tail.host[0] == [4 + 4 + (120 - 8) % 4] * lm.desc.n_kv_heads  # 4 sinks, the window of 4
        assert fmt.n_sealed(0, 0) == 120 - fmt.tail.host[0][0]


def test_bytes_held_are_features_window_positions_and_index(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path))
    d = lm.desc
    m = CSKV(k_density=0.5, v_density=0.25, window=6, group=8, sink=2, **CAL)
    eng = Engine(lm, Profile("c", methods=[m]), max_slots=2)
    seqs = [eng.start(Request(str(i), list(range(2, 2 + n)), SamplingParams(max_new_tokens=50))) for i, n in
            enumerate((150, 90))]
    for _ in range(17):
        eng.step(seqs)
    rk, rv = d.head_dim // 2, d.head_dim // 4
    item = torch.empty((), dtype=d.dtype).element_size()
    per_group = 8 * ((rk + rv) * item + 4) + 8  # features, an int32 position per token, block id + count
    total = 0
    for l in range(d.n_layers):
        fmt = eng.store.format(l)
        groups = sum(fmt.slot_groups)
        assert groups == sum(len(fmt.groups[s][h]) for s in (0, 1) for h in range(d.n_kv_heads))
        tail_tokens = sum(sum(fmt.tail.host[s]) for s in (0, 1))
        assert fmt.bytes_held() == fmt.tail.bytes_held() + groups * per_group == fmt.storage_bytes()
        assert fmt.tail.bytes_held() >= tail_tokens * 2 * d.head_dim * item
        for s, n in ((0, 150 + 17), (1, 90 + 17)):  # everything but the sinks and the window is sealed
            assert all(2 + 6 <= t <= 2 + 6 + 7 for t in fmt.tail.host[s]) and sum(fmt.host[s]) == n * d.n_kv_heads
        total += fmt.bytes_held()
    assert eng.store.bytes_held() == total
    assert eng.store.bytes_held() < 0.5 * eng.store.bytes_full()


def test_reposition_rewrites_sealed_positions_only(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path))
    eng = Engine(lm, Profile("c", methods=[Window(sink=2, recent=40), CSKV(window=4, group=4, **CAL)]))
    seq = eng.start(Request("a", list(range(2, 202)), SamplingParams(max_new_tokens=10)))
    while not seq.finish:
        eng.step([seq])
    fmt = eng.store.format(2)
    feats = {n: t.clone() for n, t in fmt.tok.items() if n != "pos"}
    before = fmt.read(0, 1)
    nxt = eng.reposition(0)
    after = fmt.read(0, 1)
    assert after.pos.tolist() == list(range(nxt)) and nxt < 200
    assert all(torch.equal(fmt.tok[n], t) for n, t in feats.items())  # no feature was touched
    assert torch.allclose(after.k, eng.runner.rotate(before.k, before.pos, after.pos), atol=1e-4)
    assert torch.allclose(after.v, before.v)


def test_calibration_is_deterministic_cached_and_keyed_by_its_parameters(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path))
    probe = make_probe(lm)
    m = CSKV(k_density=0.5, v_density=0.25, **{**CAL, "train_steps": 2})
    path = m.calibrate(probe)
    first, meta = read_tensors(path)
    assert meta["params"]["k_rank"] == 8 and meta["params"]["v_rank"] == 4
    again, _ = read_tensors(m.calibrate(probe, force=True))
    assert all(torch.equal(first[n], again[n]) for n in first)  # recomputed from scratch: the same factors

    import kvchat.methods.cskv as mod

    monkeypatch.setattr(mod, "moments", lambda *a: pytest.fail("the cached factors were recomputed"))
    Engine(lm, Profile("c", methods=[CSKV(k_density=0.5, v_density=0.25, **{**CAL, "train_steps": 2})]))
    other = CSKV(k_density=0.25, v_density=0.25, **{**CAL, "train_steps": 2})
    monkeypatch.setattr(mod, "moments", lambda *a: pytest.fail("the moments were recomputed for another rank"))
    assert other.calibrate(probe) != path  # another rank: another file, from the cached moments
    text = tmp_path / "mine.txt"
    text.write_text("a private text to calibrate on " * 40)
    monkeypatch.undo()
    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path))
    mine = calibrate(probe, CSKV(k_density=0.5, v_density=0.25, **CAL), data=str(text))
    assert mine.parent == path.parent and mine != path and read_tensors(mine)[1]["params"]["data"].startswith("file-")


def test_pca_factors_are_the_principal_directions(lm, tmp_path, monkeypatch):
    """No refinement: down = up^T orthonormal, and on the calibration keys the error is Eckart-Young's
    bound (the smallest eigenvalues' sum), below a random subspace's."""
    from kvchat.calibration.data import samples

    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path))
    probe = make_probe(lm)
    fac, _ = read_tensors(CSKV(k_density=0.25, v_density=0.25, **CAL).calibrate(probe))
    P, mu = fac["k_down"][1, 0], fac["k_mu"][1, 0]
    assert torch.allclose(P.T @ P, torch.eye(P.shape[1]), atol=1e-5) and torch.equal(P.T, fac["k_up"][1, 0])
    keys = []
    for ids in samples(probe.tokenizer, CAL["calib_samples"], CAL["calib_tokens"], 0):
        probe.run(torch.tensor(ids), trace=lambda l, t: keys.append(t["k_pre"][:, 0]) if l == 1 else None)
    x = torch.cat(keys).double() - mu.double()
    assert torch.allclose(x.mean(0), torch.zeros(x.shape[1], dtype=torch.float64), atol=1e-4)
    err = lambda B: float(((x - x @ B @ B.T) ** 2).sum())  # noqa: E731
    lam = torch.linalg.eigvalsh(x.T @ x)  # ascending
    assert err(P.double()) == pytest.approx(float(lam[: x.shape[1] - P.shape[1]].sum()), rel=1e-3)
    rnd = torch.linalg.qr(torch.randn(P.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    assert err(P.double()) < err(rnd)


@pytest.mark.parametrize("kw, message", [
    ({"k_density": 0.0}, "cskv.k_density must be > 0.0"),
    ({"v_density": 1.5}, "cskv.v_density must be <= 1.0"),
    ({"window": -1}, "cskv.window must be >= 0"),
    ({"train_steps": 2.5}, "cskv.train_steps must be an integer"),
])
def test_bad_parameters_are_one_line_errors(kw, message):
    with pytest.raises(ProfileError, match=message) as e:
        CSKV(**kw)
    assert "\n" not in str(e.value)


def test_first_chunk_attention_is_the_chunk_own(lm):
    """What `attend_prefill` returns for a first chunk is plain causal attention over its K/V (no features)."""
    d = lm.desc
    fmt = fmt_with(lm, random_factors(d.n_kv_heads, d.head_dim, 4, 4))
    g = torch.Generator().manual_seed(5)
    T = 12
    k_pre, v = torch.randn(T, d.n_kv_heads, d.head_dim, generator=g), torch.randn(T, d.n_kv_heads, d.head_dim, generator=g)
    k = fmt.rope.rotate(k_pre, torch.arange(T).view(-1, 1).expand(T, d.n_kv_heads))
    fmt.append_chunk(0, k_pre, k, v, torch.arange(T))
    q = torch.randn(T, d.n_heads, d.head_dim, generator=g)
    out, _ = fmt.attend_prefill(q, 0, torch.arange(T), 0.25, 0, fresh=(k, v))
    assert torch.equal(out, causal_attention(q, k, v, 0.25)[0])
