"""kernels/cpu.py's native ops against their torch references, on odd shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvchat_kernels import cpu
from kvchat_kernels.paged_attention import paged_decode_attention_ref
from kvchat.engine.forward import rope_rolled, signed_sin

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # relative to the largest magnitude


def close(got, want, dtype, scale=None):
    scale = scale or max(want.float().abs().max().item(), 1e-6)
    err = (got.float() - want.float()).abs().max().item() / scale
    assert err <= TOL[dtype], f"{dtype}: relative error {err:.2e}"


def rand(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_the_library_builds_and_shares_torchs_threads():
    assert cpu.available(), cpu.status()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert cpu.threads() == 1
        torch.set_num_threads(2)
        assert cpu.threads() == 2  # one libgomp: torch's thread count is the native ops' count
    finally:
        torch.set_num_threads(before)


def _cpu_has_amx() -> bool:
    from pathlib import Path

    flags = next((l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")), "").split()
    return "amx_bf16" in flags and "amx_tile" in flags


@pytest.fixture(params=["amx", "vectors"])
def matmul_path(request):
    """Both bfloat16 matmul paths of cpu_linear.c: AMX tiles where this CPU has them, the vector path."""
    want = request.param == "amx"
    before = cpu.amx()
    try:
        on = cpu.set_amx(want)
        assert on == (want and _cpu_has_amx()), f"AMX path {'on' if on else 'off'}; this CPU has AMX: {_cpu_has_amx()}"
        yield request.param
    finally:
        cpu.set_amx(before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K", [(1, 960, 576), (2, 37, 100), (3, 64, 31), (5, 129, 1536), (8, 7, 16), (16, 50, 64),
                                   (4, 48, 96), (7, 33, 32), (16, 16, 1536)])
def test_linear_is_f_linear(dtype, M, N, K, matmul_path):
    """(AMX takes K a multiple of 32 and N >= 16: whole 16-row blocks in pairs, an odd block, rows past the
    last block by vectors; the other shapes check that it hands them on.)"""
    if not cpu.linear_ok(dtype):
        pytest.fail(f"this machine runs kvchat's native {dtype} matmul (AVX-512{'-BF16' if dtype == torch.bfloat16 else ''})")
    x, w, b = rand(M, K, dtype=dtype, seed=1), rand(N, K, dtype=dtype, seed=2), rand(N, dtype=dtype, seed=3)
    for bias in (None, b):
        close(cpu.linear(x, w, bias), F.linear(x, w, bias), dtype)
    if dtype == torch.bfloat16:  # float32 sums of exact products either way: as close as summation order
        want = F.linear(x.float(), w.float(), b.float())
        err = (cpu.linear(x, w, b).float() - want).abs().max().item() / want.abs().max().item()
        assert err <= 2**-8, f"{matmul_path}: relative error {err:.2e} against float32 (one bfloat16 rounding)"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,dim", [(1, 576), (3, 37), (9, 1000)])
def test_add_rms_norm_is_the_residual_add_then_hf_rmsnorm(dtype, rows, dim):
    x, d, w = rand(rows, dim, dtype=dtype, seed=1), rand(rows, dim, dtype=dtype, seed=2), rand(dim, dtype=dtype, seed=3)
    want_x, want = cpu.add_rms_norm_ref(x, d, w, 1e-5)
    got_x, got = cpu.add_rms_norm(x.clone(), d, w, 1e-5)
    assert torch.equal(got_x, want_x)  # the add rounds as `x + d` does
    close(got, want, dtype)
    _, alone = cpu.add_rms_norm(x.clone(), None, w, 1e-6)
    close(alone, cpu.add_rms_norm_ref(x, None, w, 1e-6)[1], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,heads,D,extra", [(1, 12, 64, 192), (4, 3, 10, 0), (2, 5, 128, 7)])
def test_rope_is_rope_rolled_on_strided_rows(dtype, rows, heads, D, extra):
    x = rand(rows, heads * D + extra, dtype=dtype, seed=1)  # rows strided: the fused Q/K/V output
    cos, sin = rand(rows, 1, D, dtype=dtype, seed=2), rand(rows, 1, D, dtype=dtype, seed=3)
    ss = signed_sin(sin).contiguous()
    want = rope_rolled(x[:, : heads * D].view(rows, heads, D), cos, ss)
    assert torch.equal(cpu.rope(x, heads, D, cos, ss), want)  # the same roundings, elementwise


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 1536), (3, 17), (2, 300)])  # 256-wide chunks, 16-lane tails
def test_silu_mul(dtype, rows, inter):
    gu = rand(rows, 2 * inter, dtype=dtype, seed=4) * 4
    close(cpu.silu_mul(gu), cpu.silu_mul_ref(gu), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D,bs,G", [(64, 16, 3), (64, 32, 3), (64, 8, 1), (64, 4, 2), (64, 16, 4), (64, 16, 5), (40, 5, 3),
                                    (128, 8, 3)])
def test_decode_attention_is_the_reference(dtype, D, bs, G):
    """Ragged heads, an empty head, a partial last block, logit bias, column sums, GQA group sizes (D=64
    with up to 4 heads a group has its own path), q rows strided."""
    B, Hkv, NB = 3, 3, 60
    kp, vp = rand(NB, bs, D, dtype=dtype, seed=1), rand(NB, bs, D, dtype=dtype, seed=2)
    table = torch.randperm(NB, generator=torch.Generator().manual_seed(3))[: B * Hkv * 6].view(B, Hkv, 6)
    table = table.to(torch.int32).contiguous()
    lengths = torch.tensor([[5 * bs + 1, 3, 0], [bs, 6 * bs, 2 * bs - 1], [1, bs + 3, 4 * bs]], dtype=torch.int32)
    qk = rand(B, Hkv * G + Hkv, D, dtype=dtype, seed=4)
    q = qk[:, : Hkv * G]  # a view: rows strided as the fused Q/K output's are
    bias = torch.randn(NB, bs, generator=torch.Generator().manual_seed(5))
    for b in (None, bias):
        # against the float32 reference: the native op computes in float32 and rounds once (the bf16
        # reference rounds its scores and probabilities to bf16 first)
        want, want_cs = paged_decode_attention_ref(q.float(), kp.float(), vp.float(), table, lengths, 0.3, b, True)
        assert cpu.decode_attention_ok(q, kp, vp, table, lengths)
        got, cs = cpu.decode_attention(q, kp, vp, table, lengths, 0.3, b, True)
        close(got, want, dtype, scale=1.0)
        assert cs.shape == want_cs.shape
        assert (cs - want_cs).abs().max() < (1e-5 if dtype == torch.float32 else 1e-3)
        assert torch.all(got[0, 2 * G : 3 * G] == 0)  # the empty head


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cap", [200, 40], ids=["room", "clipped"])
def test_decode_attention_adds_column_sums_into_running_scores(dtype, cap):
    """`colsum_into`: each slot's sums added into its own row of a method's buffer (rows out of order,
    tokens below the cap), bit for bit what adding the returned sums does; other rows untouched."""
    B, Hkv, G, D, bs, NB = 3, 3, 3, 64, 16, 60
    kp, vp = rand(NB, bs, D, dtype=dtype, seed=1), rand(NB, bs, D, dtype=dtype, seed=2)
    table = torch.randperm(NB, generator=torch.Generator().manual_seed(3))[: B * Hkv * 6].view(B, Hkv, 6)
    table = table.to(torch.int32).contiguous()
    lengths = torch.tensor([[81, 3, 0], [16, 96, 31], [1, 19, 64]], dtype=torch.int32)
    q = rand(B, Hkv * G, D, dtype=dtype, seed=4)
    scores = torch.rand(5, Hkv, cap, generator=torch.Generator().manual_seed(6))
    slots = [4, 0, 2]
    out, cs = cpu.decode_attention(q, kp, vp, table, lengths, 0.3, None, True)
    want = scores.clone()
    T = min(cap, cs.shape[2])
    want[slots, :, :T] += cs[:, :, :T]
    got = scores.clone()
    out2 = cpu.decode_attention(q, kp, vp, table, lengths, 0.3, None, True, colsum_into=got,
                                colsum_rows=torch.tensor(slots))
    assert torch.equal(out2, out)
    assert torch.equal(got, want)
    assert torch.equal(got[[1, 3]], scores[[1, 3]])


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_with_uniform_lengths_needs_no_lengths_tensor(dtype):
    kp, vp = rand(12, 4, 16, dtype=dtype, seed=1), rand(12, 4, 16, dtype=dtype, seed=2)
    table = torch.arange(12, dtype=torch.int32).view(1, 2, 6)
    q = rand(1, 4, 16, dtype=dtype, seed=3)
    lengths = torch.full((1, 2), 22, dtype=torch.int32)
    want = paged_decode_attention_ref(q, kp, vp, table, lengths, 0.25)
    close(cpu.decode_attention(q, kp, vp, table, None, 0.25, max_len=22, min_len=22), want, dtype, scale=1.0)


def test_scatter_rows_writes_each_head_its_row():
    pool = torch.zeros(4, 3, 5)
    val = torch.arange(2 * 2 * 9, dtype=torch.float32).view(2, 2, 9)[:, :, 2:7]  # strided rows
    rows = [0, 7, 11, 4]
    cpu.scatter_rows(pool, val, cpu.rows_array(rows))
    flat = pool.view(-1, 5)
    for i, r in enumerate(rows):
        assert torch.equal(flat[r], val[i // 2, i % 2])
    pos = torch.zeros(4, 3, dtype=torch.int32)
    cpu.scatter_rows(pos, torch.tensor([7, 9], dtype=torch.int32).view(2, 1).expand(2, 2), cpu.rows_array(rows))
    assert pos.view(-1)[rows].tolist() == [7, 7, 9, 9]


def test_a_compiler_that_fails_leaves_the_torch_path_and_says_why(tmp_path):
    """No native library (here: a `cc` that always fails): kvchat decodes on the torch path, and one line
    on stderr says so and why."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, CC="/bin/false", KVCHAT_HOME=str(tmp_path))
    env.pop("KVCHAT_NATIVE", None)
    code = ("import torch; from kvchat_kernels import cpu, choose_impl; "
            "print(cpu.enabled(), cpu.enabled(), choose_impl(torch.device('cpu')), cpu.status())")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("False False ref torch (build failed: /bin/false failed"), res.stdout
    assert res.stderr.count("native CPU decode ops unavailable") == 1, res.stderr



def _sdpa_causal(q, k, v, scale):
    return F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                          is_causal=True, scale=scale, enable_gqa=True)[0].transpose(0, 1)


def _qkv_views(T, Hq, Hkv, seed):
    """q and v as strided views of one fused projection (as a prefill's are), k contiguous (after RoPE)."""
    qkv = rand(T, Hq + 2 * Hkv, 64, dtype=torch.bfloat16, seed=seed) * 2
    return qkv[:, :Hq], qkv[:, Hq : Hq + Hkv].contiguous(), qkv[:, Hq + Hkv :]


def _fast_prefill_expected() -> bool:
    """This CPU has AVX512-BF16 and the library is built for it (the portable build below is not)."""
    import os
    from pathlib import Path

    flags = next((l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")), "").split()
    return "avx512_bf16" in flags and os.environ.get("KVCHAT_NATIVE_MARCH", "native") == "native"


@pytest.mark.parametrize("T", [1, 3, 31, 32, 33, 100, 260])
@pytest.mark.parametrize("Hq,Hkv", [(9, 3), (4, 4), (8, 2)])
def test_causal_attention_is_sdpa_to_bfloat16_rounding(T, Hq, Hkv):
    """cpu_prefill.c against torch's causal SDPA in float32 on the same bfloat16 inputs: as close as torch's
    own bfloat16 SDPA is (both round the probabilities and the output to bfloat16), on tails of the 4-query
    tiles and 32-key steps. Where the CPU lacks AVX512-BF16 the kernel must say it is not there."""
    q, k, v = _qkv_views(T, Hq, Hkv, seed=T)
    if not _fast_prefill_expected():
        assert not cpu.causal_attention_ok(q, k, v)
        return
    assert cpu.causal_attention_ok(q, k, v), cpu.status()
    scale = 0.125
    want = _sdpa_causal(q.float(), k.float(), v.float(), scale)
    got = cpu.causal_attention(q, k, v, scale).float()
    torch_bf16 = _sdpa_causal(q, k, v, scale).float()
    close(got, want, torch.bfloat16)
    assert (got - want).abs().mean() <= 1.25 * (torch_bf16 - want).abs().mean() + 1e-6


def test_causal_attention_reads_no_key_after_a_query_and_every_key_up_to_it():
    q, k, v = _qkv_views(70, 9, 3, seed=7)
    if not _fast_prefill_expected():
        assert not cpu.causal_attention_ok(q, k, v)
        return
    out = cpu.causal_attention(q, k, v, 0.125)
    for c in (1, 33, 69):  # keys and values from position c on replaced: earlier outputs bit for bit the same
        k2, v2 = k.clone(), v.clone()
        k2[c:], v2[c:] = rand(70 - c, 3, 64, dtype=torch.bfloat16, seed=c), rand(70 - c, 3, 64, dtype=torch.bfloat16, seed=-c)
        out2 = cpu.causal_attention(q, k2, v2, 0.125)
        assert torch.equal(out2[:c], out[:c])
        assert not torch.equal(out2[c], out[c])  # query c sees its own key


def test_causal_attention_takes_only_what_it_computes():
    q, k, v = _qkv_views(16, 9, 3, seed=3)
    assert not cpu.causal_attention_ok(q.float(), k.float(), v.float())  # float32: torch's flash attention
    q2 = rand(16, 9, 32, dtype=torch.bfloat16, seed=1)
    k2 = rand(16, 3, 32, dtype=torch.bfloat16, seed=2)
    assert not cpu.causal_attention_ok(q2, k2, k2)  # head size 32
    assert not cpu.causal_attention_ok(q, k, v[:, :2])  # shapes differ


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g,E,C,D", [(1, 1, 1, 64), (3, 5, 17, 64), (3, 190, 1500, 64), (2, 33, 40, 128), (1, 7, 100, 48),
                                     (2, 9, 31, 33), (3, 4, 16, 64), (1, 6, 32, 64)])
def test_max_cosine_is_the_float32_reference(dtype, g, E, C, D):
    """cpu_similar.c against float32 normalize-matmul-max on the same inputs, on tails of its 4-row tiles
    and 16- and 32-row blocks, an odd head size (the bfloat16 pair path needs an even one) and a large
    eviction: the same best similarity to float32 rounding, the same row wherever the runner-up is not
    within that rounding."""
    a, b = rand(g, E, D, dtype=dtype, seed=E), rand(g, C, D, dtype=dtype, seed=C)
    b[:, C // 2] = 0  # a zero key: cosine 0 (F.normalize's epsilon), not NaN
    assert cpu.max_cosine_ok(a, b), cpu.status()
    best, idx = cpu.max_cosine(a, b)
    want, want_idx = cpu.max_cosine_ref(a, b)
    assert best.dtype == torch.float32 and idx.dtype == torch.int64 and best.shape == idx.shape == (g, E)
    assert (best - want).abs().max() <= 1e-6
    u = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).transpose(-1, -2)
    runner_up = u.topk(min(2, C), -1).values[..., -1]
    clear = (want - runner_up) > 1e-6 if C > 1 else torch.ones_like(want, dtype=torch.bool)
    assert torch.equal(idx[clear], want_idx[clear]) and clear.float().mean() > 0.9
    assert (u.gather(-1, idx.unsqueeze(-1)).squeeze(-1) - want).abs().max() <= 1e-6  # ties: a row as good


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_cosine_breaks_ties_to_the_first_row_as_torch_does(dtype):
    """Rows 5, 10, 21 and 37 of b are one key (the same lane of the next 32-row step, the other 16-row half,
    another lane); a row of a along it finds row 5, whatever its length."""
    b = rand(1, 60, 64, dtype=dtype, seed=1)
    for c in (10, 21, 37):
        b[0, c] = b[0, 5]
    a = torch.stack([b[0, 5] * 2, b[0, 5], rand(64, dtype=dtype, seed=2)])[None]
    best, idx = cpu.max_cosine(a.contiguous(), b)
    assert idx[0, :2].tolist() == [5, 5] and idx[0, :2].tolist() == cpu.max_cosine_ref(a, b)[1][0, :2].tolist()
    assert best[0, :2].tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [1, 3, 17, 33])
def test_max_cosine_finds_a_real_row_when_every_cosine_is_negative(dtype, C):
    """Rows of a opposite to every row of b: the best is negative and its row one of b's, never the zero
    padding past C (whose cosine, 0, would beat them all)."""
    e0 = torch.zeros(64)
    e0[0] = 1
    b = (e0 + 0.1 * rand(2, C, 64, dtype=torch.float32, seed=C)).to(dtype)
    a = (-e0).expand(2, 5, 64).to(dtype).contiguous()
    best, idx = cpu.max_cosine(a, b)
    want, want_idx = cpu.max_cosine_ref(a, b)
    assert (best < 0).all() and (idx < C).all() and (idx >= 0).all()
    assert (best - want).abs().max() <= 1e-6 and torch.equal(idx, want_idx)


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_cosine_ties_across_the_two_halves_of_a_step_go_to_the_first_row(dtype):
    """Row 21 (second 16-row half of the first 32-row step) and row 37 (first half of the next) are one
    key: 21 wins, as it would in torch."""
    b = rand(1, 50, 64, dtype=dtype, seed=3)
    b[0, 37] = b[0, 21]
    a = b[:, 21:22].clone()
    assert cpu.max_cosine(a, b)[1].item() == 21


def test_max_cosine_takes_only_what_it_computes():
    a, b = rand(3, 4, 64, dtype=torch.float32, seed=1), rand(3, 9, 64, dtype=torch.float32, seed=2)
    assert cpu.max_cosine_ok(a, b)
    assert not cpu.max_cosine_ok(a, b.bfloat16())  # dtypes differ
    assert not cpu.max_cosine_ok(a, b[:2])  # heads differ
    assert not cpu.max_cosine_ok(a, b[:, :0])  # nothing to compare with
    assert not cpu.max_cosine_ok(a, b.transpose(1, 2).contiguous().transpose(1, 2))  # not contiguous
    assert not cpu.max_cosine_ok(a[0], b[0])  # no head dim
    best, idx = cpu.max_cosine(a[:, :0].contiguous(), b)  # nothing evicted: empty answers
    assert best.shape == idx.shape == (3, 0)


def test_the_portable_paths_built_for_avx2_match_the_references_too(tmp_path):
    """This machine compiles the AVX-512 paths; the ones other CPUs run (cpu_linear.c's AVX2 + FMA matmul in
    both dtypes, plain C the compiler vectorizes elsewhere) are built here for x86-64-v3 (AVX2) and run this
    file's op tests and the fused decode layer's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, KVCHAT_NATIVE_MARCH="x86-64-v3", KVCHAT_HOME=str(tmp_path))
    probe = ("import torch; from kvchat_kernels import cpu; "
             "print(cpu.enabled(), cpu.linear_ok(torch.float32), cpu.linear_ok(torch.bfloat16), cpu.amx())")
    res = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert res.stdout.split() == ["True", "True", "True", "False"], res.stdout + res.stderr
    here = Path(__file__).parent
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          str(here / "test_decode_layer.py"), "-k", "not portable and not compiler"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and " passed" in res.stdout, res.stdout[-2000:]
