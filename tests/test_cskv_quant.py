"""cskv with `bits` (profile cskv-kivi4): a sealed token holds packed KIVI codes of its features and nothing
wider; reads and attention see the de-quantized features; bytes follow the formula. The registry matrix
(tests/test_protocol.py, entry "cskv:kivi4") composes it with every policy and layout."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from kvchat.engine import Engine, Request, SamplingParams
from kvchat.engine.probe import make_probe
from kvchat.errors import ProfileError
from kvchat.methods.cskv import CSKV, Rope
from kvchat.methods.cskv_quant import QuantFeatureFormat
from kvchat.profiles import Profile
from kvchat_kernels.kv_quant import minmax
from test_cskv import CAL, fill, random_factors, reference

# The tiny models' head_dim is 16: rank 8 packs at 4 and 2 bits.


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", layers=3)


def qfmt(lm, fac, bits=4, qgroup=4, group=4, window=3, pinned=0) -> QuantFeatureFormat:
    d = lm.desc
    rope = Rope(make_probe(lm).rope_tables, d.dtype, d.device)
    return QuantFeatureFormat(1, d.n_kv_heads, d.head_dim, 4, d.dtype, d.device, factors=fac, rope=rope, group=group,
                              residual=window, pinned=pinned, bits=bits, qgroup=qgroup)


@pytest.mark.parametrize("bits", [4, 2])
def test_sealed_tokens_hold_codes_and_read_back_dequantized_features(lm, bits):
    d = lm.desc
    H, D = d.n_kv_heads, d.head_dim
    fac = random_factors(H, D, 8, 8)
    fmt = qfmt(lm, fac, bits=bits, pinned=2)
    T = 23
    k_pre, k, v = fill(fmt, T)
    n_sealed = (T - 2 - 3) // 4 * 4
    assert set(fmt.tok) == {"ckc", "cvc", "cvs", "cvo", "pos"} and set(fmt.grp) == {"cks", "cko"}
    assert fmt.tok["ckc"].dtype == torch.uint8 and fmt.tok["ckc"].shape[-1] == 8 * bits // 8
    s = torch.arange(2, 2 + n_sealed)
    for h in range(H):
        t = fmt.read(0, h)
        ck = (k_pre[s, h] - fac["k_mu"][h]) @ fac["k_down"][h]  # the features before quantization
        cv = (v[s, h] - fac["v_mu"][h]) @ fac["v_down"][h]
        # Keys per channel over each group of 4 tokens, values per token over 4 channels: within half a step.
        kq, ks, km = minmax(ck.view(-1, 4, 8), bits, dim=1)
        vq, vs, vm = minmax(cv.view(-1, 2, 4), bits, dim=-1)
        rk = (kq * ks.float() + km.float()).view(-1, 8)
        rv = (vq * vs.float() + vm.float()).view(-1, 8)
        want_k = fmt.rope.rotate(fac["k_mu"][h] + rk @ fac["k_up"][h], s)
        want_v = fac["v_mu"][h] + rv @ fac["v_up"][h]
        assert torch.allclose(t.k[s], want_k, atol=1e-3) and torch.allclose(t.v[s], want_v, atol=1e-3)
        assert (rk - ck).abs().max() <= ks.float().max() / 2 + 1e-3  # rounding error: half a step at most
        rest = torch.cat([torch.arange(2), torch.arange(2 + n_sealed, T)])  # sinks and window: untouched
        assert torch.equal(t.k[rest], k[rest, h]) and torch.equal(t.v[rest], v[rest, h])


def test_decode_attention_equals_attention_over_what_read_returns(lm):
    d = lm.desc
    H, D, G = d.n_kv_heads, d.head_dim, d.n_heads // d.n_kv_heads
    fmt = qfmt(lm, random_factors(H, D, 8, 8), pinned=1)
    fmt.chunk_groups = 2
    fill(fmt, 40)
    q = torch.randn(1, H * G, D, generator=torch.Generator().manual_seed(3))
    out, col = fmt.attend_decode(q, [0], torch.tensor([0]), 0.3, colsum=True)
    for h in range(H):
        want, p = reference(q[:, h * G : (h + 1) * G], fmt.read(0, h), 0.3)
        assert torch.allclose(out[0, h * G : (h + 1) * G], want[0], atol=1e-5)
        assert torch.allclose(col[0, h, :40], p[0].sum(0), atol=1e-5)


def test_bytes_held_are_codes_scales_window_positions_and_index(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path))
    d = lm.desc
    m = CSKV(k_density=0.5, v_density=0.5, window=6, group=8, sink=2, bits=4, qgroup=4, **CAL)
    eng = Engine(lm, Profile("c", methods=[m]), max_slots=2)
    seqs = [eng.start(Request(str(i), list(range(2, 2 + n)), SamplingParams(max_new_tokens=50))) for i, n in
            enumerate((150, 90))]
    for _ in range(17):
        eng.step(seqs)
    r = d.head_dim // 2
    # per token: key and value codes (r / 2 bytes each), a float16 scale and minimum per 4 value channels,
    # an int32 position; per group: a float16 scale and minimum per key channel, block id + count.
    per_group = 8 * (2 * r // 2 + (r // 4) * 4 + 4) + r * 4 + 8
    for l in range(d.n_layers):
        fmt = eng.store.format(l)
        assert isinstance(fmt, QuantFeatureFormat)
        groups = sum(fmt.slot_groups)
        assert groups > 0 and fmt.bytes_held() == fmt.tail.bytes_held() + groups * per_group == fmt.storage_bytes()
    assert eng.store.bytes_held() < 0.3 * eng.store.bytes_full()


def test_ranks_that_do_not_pack_are_one_line_errors(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path))
    m = CSKV(k_density=0.5, v_density=0.375, bits=4, qgroup=4, **CAL)  # value rank 6: not a multiple of 4
    with pytest.raises(ProfileError, match="value rank must be a multiple of qgroup 4") as e:
        Engine(lm, Profile("c", methods=[m]))
    assert "\n" not in str(e.value)
    with pytest.raises(ProfileError, match="cskv.bits must be 0"):
        CSKV(bits=3)
