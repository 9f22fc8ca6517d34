"""Every Triton kernel against its torch reference.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1) on CPU float32 tensors:
the interpreter has no bfloat16. With CUDA they run compiled, in float32 and half precisions.
Shapes are odd on purpose: lengths that are not multiples of the block size, heads of one slot with
different lengths, empty heads, single-token slots, shuffled (non-contiguous) block ids.
"""

import importlib
import os
import sys

import torch

CUDA = torch.cuda.is_available()
_TRITON_WAS_IMPORTED = "triton" in sys.modules
if not CUDA:
    # Must be set before triton is imported: @triton.jit (triton.language's own helpers included) reads
    # it when it decorates.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

triton = pytest.importorskip("triton")
from triton.language import standard as _tl_standard  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

# tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton; if triton was imported
# without it, the kernels would try to compile for a GPU: fail loudly rather than skip.
IN_PROCESS = CUDA or isinstance(_tl_standard.zeros, InterpretedFunction)

# importlib: the package re-exports functions named like two of its modules (prefill_attention)
PA = importlib.import_module("kvchat_kernels.paged_attention")
PF = importlib.import_module("kvchat_kernels.prefill_attention")
SO = importlib.import_module("kvchat_kernels.store_ops")

DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if CUDA else [torch.float32]
TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}  # atol, rtol


def test_interpreter_is_active():
    assert IN_PROCESS, ("triton was imported before TRITON_INTERPRET=1 was set: run the kernel tests through "
                        "pytest from the repository root so tests/conftest.py sets it first")


def assert_close(got, want, dtype, what=""):
    atol, rtol = TOL[dtype]
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want = got.float(), want.float()
    assert not torch.isnan(got).any(), f"{what}: NaN in kernel output"
    err = (got - want).abs()
    ok = bool((err <= atol + rtol * want.abs()).all())
    assert ok, f"{what}: max abs err {err.max().item():.3e}, mean abs err {err.mean().item():.3e} (atol {atol}, rtol {rtol})"


def make_store(lengths, block_size, D, dtype, extra_blocks=2, seed=0):
    """Pools with shuffled block ids for `lengths` (B, H_kv); unused table entries stay 0."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.as_tensor(lengths, dtype=torch.int32)
    B, Hkv = lengths.shape
    need = [-(-int(n) // block_size) for n in lengths.flatten()]
    max_blocks = max(need + [1]) + extra_blocks
    n_blocks = sum(need) + 3  # a few spare blocks holding garbage
    ids = torch.randperm(n_blocks, generator=g)
    table = torch.zeros(B * Hkv, max_blocks, dtype=torch.int32)
    at = 0
    for row, n in enumerate(need):
        table[row, :n] = ids[at : at + n].int()
        at += n
    k = torch.randn(n_blocks, block_size, D, generator=g).to(dtype)
    v = torch.randn(n_blocks, block_size, D, generator=g).to(dtype)
    bias = torch.randn(n_blocks, block_size, generator=g)
    dev = DEVICE
    return (k.to(dev), v.to(dev), table.view(B, Hkv, max_blocks).to(dev), lengths.to(dev), bias.to(dev))


def test_kernels_run_interpreted_without_cuda_and_compiled_with_it():
    from triton.runtime.jit import JITFunction

    for kernel in (PA._decode_partial_kernel, PA._decode_merge_kernel, PA._decode_colsum_kernel,
                   PF._prefill_kernel, PF._prefill_rows_kernel, SO._store_write_kernel, SO._store_gather_kernel):
        if CUDA:  # compiled for the GPU: the tests below then check the real kernels, not the interpreter
            assert isinstance(kernel, JITFunction) and not isinstance(kernel, InterpretedFunction), kernel
        else:
            assert isinstance(kernel, InterpretedFunction), kernel


# ---- paged decode attention ------------------------------------------------------------------------

DECODE_LENGTHS = [[37, 0], [1, 1], [70, 45]]  # ragged, an empty head, a single-token slot, several blocks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("colsum", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("G", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("D", [64, 128])
def test_decode_matches_ref(D, G, with_bias, colsum, dtype):
    k, v, table, lengths, bias = make_store(DECODE_LENGTHS, 16, D, dtype, seed=D + G)
    B, Hkv = lengths.shape
    q = torch.randn(B, Hkv * G, D, generator=torch.Generator().manual_seed(G)).to(dtype).to(DEVICE)
    bp = bias if with_bias else None
    scale = D**-0.5
    want = PA.paged_decode_attention_ref(q, k, v, table, lengths, scale, bp, colsum)
    got = PA.paged_decode_attention(q, k, v, table, lengths, scale, bp, colsum, impl="triton")
    if colsum:
        assert_close(got[0], want[0], dtype, "out")
        assert_close(got[1], want[1], dtype, "colsum")
        assert got[1][0, 1].abs().sum() == 0  # the empty head receives nothing
    else:
        assert_close(got, want, dtype, "out")
    out = got[0] if colsum else got
    assert out[0, G : 2 * G].abs().sum() == 0  # empty head: zeros, not NaN


def naive_decode(q, k, v, table, lengths, scale, bias):
    """Attention one (slot, head) at a time over its tokens read one by one: the oracle of the oracle."""
    B, Hq, D = q.shape
    Hkv, bs = table.shape[1], k.shape[1]
    G = Hq // Hkv
    out = torch.zeros(B, Hq, D)
    col = torch.zeros(B, Hkv, max(1, -(-int(lengths.max()) // bs)) * bs)
    for b in range(B):
        for h in range(Hkv):
            n = int(lengths[b, h])
            if n == 0:
                continue
            rows = [(int(table[b, h, i // bs]), i % bs) for i in range(n)]
            kk = torch.stack([k[blk, off] for blk, off in rows]).float()
            vv = torch.stack([v[blk, off] for blk, off in rows]).float()
            s = q[b, h * G : (h + 1) * G].float() @ kk.T * scale
            if bias is not None:
                s = s + torch.stack([bias[blk, off] for blk, off in rows])
            p = torch.softmax(s, -1)
            out[b, h * G : (h + 1) * G] = p @ vv
            col[b, h, :n] = p.sum(0)
    return out, col


@pytest.mark.parametrize("lengths", [[[48, 48, 48]], [[37, 37, 37], [37, 37, 37]], [[37, 5, 37]], [[16, 0, 3]],
                                     [[1056, 1056, 1056]], [[1100, 1100, 1100]], [[1100, 40, 1030]]],
                         ids=["uniform-whole-blocks", "uniform-partial-block", "ragged", "ragged-empty",
                              "pool-uniform-whole", "pool-uniform-partial", "pool-ragged"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("fn", ["ref", "cpu"])
def test_decode_cpu_paths_with_host_lengths_equal_the_naive_oracle(lengths, with_bias, fn):
    """The CPU decode paths: lengths known on the host (no read-back), no mask when every head agrees;
    from 1,024 tokens one slot attends over its whole pool (`paged_decode_attention_cpu`)."""
    k, v, table, lens, bias = make_store(lengths, 16, 64, torch.float32, seed=len(lengths[0]))
    B, Hkv = lens.shape
    q = torch.randn(B, Hkv * 3, 64, generator=torch.Generator().manual_seed(3))
    bp = bias if with_bias else None
    flat = [n for row in lengths for n in row]
    mx, mn = max(flat), min(flat)
    want_out, want_col = naive_decode(q, k, v, table, lens, 0.125, bp)
    attend = PA.paged_decode_attention_ref if fn == "ref" else PA.paged_decode_attention_cpu
    got_out, got_col = attend(q, k, v, table, None if mx == mn else lens, 0.125, bp, True, max_len=mx, min_len=mn)
    assert_close(got_out, want_out, torch.float32, "out")
    assert_close(got_col, want_col, torch.float32, "colsum")
    plain = PA.paged_decode_attention_ref(q, k, v, table, lens, 0.125, bp, False)  # lengths read from the tensor
    if fn == "ref":
        assert torch.equal(plain, got_out)


@pytest.mark.parametrize("num_splits,block_n", [(1, 16), (3, 16), (7, 16), (2, 32), (64, 16)])
def test_decode_split_k(num_splits, block_n):
    dtype = torch.float32
    k, v, table, lengths, bias = make_store([[100, 3], [0, 57]], 16, 64, dtype, seed=num_splits)
    q = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    want = PA.paged_decode_attention_ref(q, k, v, table, lengths, 0.125, bias, True)
    got = PA.paged_decode_attention_triton(q, k, v, table, lengths, 0.125, bias, True,
                                           num_splits=num_splits, block_n=block_n)
    assert_close(got[0], want[0], dtype, f"out, {num_splits} splits")
    assert_close(got[1], want[1], dtype, f"colsum, {num_splits} splits")


@pytest.mark.parametrize("D", [64, 80])
def test_decode_odd_block_size_and_strided_q(D):
    # block_size 12 (not a power of two), head_dim 80 (padded to 128), q a slice of a fused-QKV-like tensor
    dtype = torch.float32
    k, v, table, lengths, bias = make_store([[29, 13, 1]], 12, D, dtype, seed=5)
    qkv = torch.randn(1, 6, 3 * D, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    q = qkv[..., D : 2 * D]
    assert not q.is_contiguous()
    want = PA.paged_decode_attention_ref(q.contiguous(), k, v, table, lengths, 0.125, bias, True)
    got = PA.paged_decode_attention_triton(q, k, v, table, lengths, 0.125, bias, True, num_splits=2, block_n=16)
    assert_close(got[0], want[0], dtype, "out")
    assert_close(got[1], want[1], dtype, "colsum")


def test_decode_all_empty():
    k, v, table, lengths, _ = make_store([[0, 0]], 16, 64, torch.float32)
    q = torch.randn(1, 4, 64).to(DEVICE)
    out, col = PA.paged_decode_attention(q, k, v, table, lengths, 0.125, None, True, impl="triton")
    assert out.abs().sum() == 0 and col.shape == (1, 2, 16) and col.abs().sum() == 0


# ---- prefill attention -----------------------------------------------------------------------------

def _prefill_case(lengths, T, G, D, dtype, seed):
    k, v, table, lens, bias = make_store([lengths], 16, D, dtype, seed=seed)
    Hkv = len(lengths)
    q = torch.randn(T, Hkv * G, D, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).to(DEVICE)
    return q, k, v, table[0], lens[0], bias


def _check_prefill(q, k, v, table, lens, bias, last_w, dtype, **tiles):
    scale = q.shape[-1] ** -0.5
    want = PF.prefill_attention_ref(q, k, v, table, lens, scale, bias, last_w)
    if tiles:
        got = PF.prefill_attention_triton(q, k, v, table, lens, scale, bias, last_w, **tiles)
    else:
        got = PF.prefill_attention(q, k, v, table, lens, scale, bias, last_w, impl="triton")
    if last_w > 0:
        assert_close(got[0], want[0], dtype, "out")
        assert_close(got[1], want[1], dtype, "rows")
    else:
        assert_close(got, want, dtype, "out")
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("last_w", [0, 3, 40])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("G", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("D", [64, 128])
def test_prefill_matches_ref(D, G, with_bias, last_w, dtype):
    # a 9-token chunk on heads with different pasts (32 and 14 tokens, not block multiples)
    q, k, v, table, lens, bias = _prefill_case([41, 23], 9, G, D, dtype, seed=D + G)
    _check_prefill(q, k, v, table, lens, bias if with_bias else None, last_w, dtype)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(
    "lengths,T",
    [([9, 9], 9),  # first chunk: plain causal
     ([41, 0], 9),  # an empty head
     ([41, 5], 9),  # a head holding fewer tokens than the chunk: its early queries see nothing
     ([1, 1], 1),  # a single-token sequence
     ([70, 33, 50], 20)],  # several blocks, three heads
)
def test_prefill_shapes(lengths, T, with_bias):
    dtype = torch.float32
    q, k, v, table, lens, bias = _prefill_case(lengths, T, 3, 64, dtype, seed=T)
    got = _check_prefill(q, k, v, table, lens, bias if with_bias else None, 4, dtype)
    assert not torch.isnan(got[0]).any()


@pytest.mark.parametrize("block_r,block_n,D", [(16, 16, 64), (32, 64, 64), (128, 16, 64), (32, 32, 80)])
def test_prefill_tiles(block_r, block_n, D):
    dtype = torch.float32
    q, k, v, table, lens, bias = _prefill_case([83, 60], 37, 5, D, dtype, seed=block_r)
    _check_prefill(q, k, v, table, lens, bias, 11, dtype, block_r=block_r, block_n=block_n)


# ---- store write / gather --------------------------------------------------------------------------

def _pools(dtype, n_blocks=9, bs=12, D=64):
    g = torch.Generator().manual_seed(3)
    return [
        torch.randn(n_blocks, bs, D, generator=g).to(dtype).to(DEVICE),  # K
        torch.randn(n_blocks, bs, D, generator=g).to(dtype).to(DEVICE),  # V
        torch.randint(0, 1000, (n_blocks, bs), generator=g, dtype=torch.int32).to(DEVICE),  # positions
        torch.randn(n_blocks, bs, generator=g).to(DEVICE),  # bias
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [0, 1, 29])
def test_store_write_and_gather(N, dtype):
    pools = _pools(dtype)
    n_blocks, bs, D = pools[0].shape
    g = torch.Generator().manual_seed(N)
    loc = torch.randperm(n_blocks * bs, generator=g)[:N].to(DEVICE)  # distinct (block, offset) targets
    blocks, offsets = loc // bs, loc % bs
    values = [
        torch.randn(N, D, generator=g).to(DEVICE),  # float32 into the model dtype
        torch.randn(D, N, generator=g).to(DEVICE).t(),  # non-contiguous rows
        torch.arange(N, device=DEVICE) + 5000,  # int64 into int32
        torch.randn(N, generator=g).to(DEVICE),
    ]
    want = [p.clone() for p in pools]
    SO.store_write_ref(want, blocks, offsets, values)
    got = [p.clone() for p in pools]
    SO.store_write(got, blocks, offsets, values, impl="triton")
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"pool {i}: max abs err {(a.float() - b.float()).abs().max()}"
    for i, (a, b) in enumerate(zip(SO.store_gather(got, blocks, offsets, impl="triton"),
                                   SO.store_gather_ref(want, blocks, offsets))):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"gather pool {i}"


# ---- causality by stored position, 16-bit stores under a 32-bit model ----------------------------------

def _positions(lengths, T, seed):
    """Stored positions (increasing, with gaps: evicted tokens) and chunk query positions interleaved
    with them (a layer reading a store another layer compacted)."""
    g = torch.Generator().manual_seed(seed)
    H, L = len(lengths), max(lengths)
    stored = torch.zeros(H, L, dtype=torch.int32)
    for h, n in enumerate(lengths):
        stored[h, :n] = torch.randperm(3 * L, generator=g)[:n].sort().values.int()
    q_pos = torch.randperm(3 * L, generator=g)[:T].sort().values
    return stored, q_pos


@pytest.mark.parametrize("lengths,T,G", [([41, 23], 9, 3), ([70, 33, 50], 20, 2), ([5, 0], 4, 1)])
def test_prefill_position_limits(lengths, T, G):
    dtype = torch.float32
    q, k, v, table, lens, bias = _prefill_case(lengths, T, G, 64, dtype, seed=T + G)
    stored, q_pos = _positions(lengths, T, seed=T)
    limits = PF.visible_limits(stored, lens.cpu(), q_pos).to(DEVICE)
    # the limits are the brute-force count of stored tokens at or before each query position
    for h, n in enumerate(lengths):
        brute = [(stored[h, :n] <= p).sum().item() for p in q_pos]
        assert limits[h].tolist() == brute
    scale = 0.125
    want = PF.prefill_attention_ref(q, k, v, table, lens, scale, bias, 5, limits=limits)
    got = PF.prefill_attention(q, k, v, table, lens, scale, bias, 5, limits=limits, impl="triton")
    assert_close(got[0], want[0], dtype, "out")
    assert_close(got[1], want[1], dtype, "rows")
    # and the reference itself against plain masked attention over the gathered keys
    Hkv = len(lengths)
    for h, n in enumerate(lengths):
        kh = torch.stack([k[table[h, j // 16], j % 16] for j in range(n)]) if n else torch.zeros(0, 64)
        vh = torch.stack([v[table[h, j // 16], j % 16] for j in range(n)]) if n else torch.zeros(0, 64)
        bh = torch.stack([bias[table[h, j // 16], j % 16] for j in range(n)]) if n else torch.zeros(0)
        for g in range(G):
            s = (q[:, h * G + g] @ kh.T) * scale + bh
            s = s.masked_fill(stored[h, :n].view(1, -1) > q_pos.view(-1, 1), float("-inf"))
            o = torch.softmax(s, -1).nan_to_num(0.0) @ vh
            assert_close(want[0][:, h * G + g], o, dtype, f"head {h}.{g} vs brute force")


@pytest.mark.parametrize("store_dtype", [torch.float16])
def test_16bit_store_under_fp32_queries(store_dtype):
    k, v, table, lengths, bias = make_store(DECODE_LENGTHS, 16, 64, store_dtype, seed=9)
    q = torch.randn(3, 6, 64, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    want = PA.paged_decode_attention_ref(q, k, v, table, lengths, 0.125, bias, True)
    got = PA.paged_decode_attention(q, k, v, table, lengths, 0.125, bias, True, impl="triton")
    assert got[0].dtype == torch.float32
    assert_close(got[0], want[0], torch.float32, "out")
    assert_close(got[1], want[1], torch.float32, "colsum")
    q2, k2, v2, table2, lens2, bias2 = _prefill_case([41, 23], 9, 3, 64, store_dtype, seed=4)
    q2 = q2.float()
    _check_prefill(q2, k2, v2, table2, lens2, bias2, 3, torch.float32)
