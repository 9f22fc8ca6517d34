"""Decode attention over packed groups (kernels/quant_attention.py): Triton (interpreted on CPU) against
the reference, and the reference against brute-force attention over the dequantized tokens.

Odd shapes on purpose: ragged group counts per head, partial (compacted) groups, an empty tail, a
partial residual, pinned tail tokens before the sealed ones, shuffled block ids, GQA groups 1-5.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (tests/conftest.py sets it too)

import pytest  # noqa: E402

from test_kernels import DEVICE, assert_close, make_store  # noqa: E402
from kvchat_kernels.kv_quant import grouped, minmax, minmax_zero, pack  # noqa: E402
from kvchat_kernels.quant_attention import (  # noqa: E402
    Sealed, Tail, dequant_groups, quant_decode_attention, quant_decode_attention_ref)
from kvchat_kernels.quant_attention_triton import quant_decode_attention_triton  # noqa: E402

triton = pytest.importorskip("triton")

F32 = torch.float32


def make_sealed(n_groups, GS, D, bits, layout, npin, seed=0, partial=True):
    """Quantized groups for n_groups (B, H) heads at shuffled block ids, real codes from random K/V with
    an outlier channel. layout "kivi": keys per channel over the group, values per token in GS channels;
    "token": keys and values per token in 16 channels with uint8 zero points."""
    g = torch.Generator().manual_seed(seed)
    B, H = len(n_groups), len(n_groups[0])
    total = sum(map(sum, n_groups)) + 2  # spare blocks hold garbage the tables never reference
    k = torch.randn(total, GS, D, generator=g)
    k[:, :, 3] *= 8
    v = torch.randn(total, GS, D, generator=g)
    if layout == "kivi":
        kq, ks, ko = minmax(k, bits, dim=1)
        ks, ko = ks[:, 0], ko[:, 0]
        vq, vs, vo = minmax(grouped(v, GS), bits, dim=-1)
    else:
        kq, ks, ko = minmax_zero(grouped(k, 16), bits, dim=-1)
        ks, ko = ks[..., 0], ko[..., 0]
        vq, vs, vo = minmax_zero(grouped(v, 16), bits, dim=-1)
    MG = max(max(r) for r in n_groups) or 1
    table = torch.zeros(B, H, MG, dtype=torch.int32)
    counts = torch.zeros(B, H, MG, dtype=torch.int32)
    ids = torch.randperm(total, generator=g)
    at = 0
    for b in range(B):
        for h in range(H):
            n = n_groups[b][h]
            table[b, h, :n] = ids[at : at + n].int()
            counts[b, h, :n] = GS
            if partial and n:  # compacted groups keep some rows: the newest and one in the middle
                counts[b, h, n - 1] = 1 + (b + h) % GS
                counts[b, h, n // 2] = max(1, GS // 3)
            at += n
    s = Sealed(pack(kq.view(total, GS, D), bits), ks, ko, pack(vq.view(total, GS, D), bits), vs[..., 0], vo[..., 0],
               bits, table, counts, torch.tensor(n_groups, dtype=torch.int32),
               torch.tensor(npin, dtype=torch.int32))
    return Sealed(*[t.to(DEVICE) if torch.is_tensor(t) else t for t in s])


def make_case(n_groups, tail_lengths, npin, GS, D, bits, layout, G, with_bias, seed=0):
    s = make_sealed(n_groups, GS, D, bits, layout, npin, seed)
    k, v, table, lengths, bias = make_store(tail_lengths, 16, D, F32, seed=seed + 1)
    tail = Tail(k, v, table, lengths, bias if with_bias else None)
    B, H = lengths.shape
    q = torch.randn(B, H * G, D, generator=torch.Generator().manual_seed(seed + 2)).to(DEVICE)
    return q, s, tail


def brute_force(q, s: Sealed, tail: Tail, scale):
    """Per (slot, head): storage order [tail[:npin]][sealed rows][tail[npin:]], plain softmax."""
    B, Hq, D = q.shape
    H = tail.table.shape[1]
    G = Hq // H
    bs = tail.k.shape[1]
    outs, cols = torch.zeros(B, Hq, D), []
    for b in range(B):
        row = []
        for h in range(H):
            n_t = int(tail.lengths[b, h])
            tk = torch.stack([tail.k[tail.table[b, h, j // bs], j % bs] for j in range(n_t)]) if n_t else torch.zeros(0, D)
            tv = torch.stack([tail.v[tail.table[b, h, j // bs], j % bs] for j in range(n_t)]) if n_t else torch.zeros(0, D)
            tb = (torch.stack([tail.bias[tail.table[b, h, j // bs], j % bs] for j in range(n_t)]) if n_t
                  else torch.zeros(0)) if tail.bias is not None else torch.zeros(n_t)
            ks, vs = [], []
            for j in range(int(s.n[b, h])):
                gk, gv = dequant_groups(s, s.table[b, h, j].long().view(1), F32)
                c = int(s.counts[b, h, j])
                ks.append(gk[0, :c])
                vs.append(gv[0, :c])
            p = int(s.npin[b, h])
            K = torch.cat([tk[:p], *ks, tk[p:]])
            V = torch.cat([tv[:p], *vs, tv[p:]])
            bias = torch.cat([tb[:p], torch.zeros(sum(x.shape[0] for x in ks)), tb[p:]])
            sc = (q[b, h * G : (h + 1) * G].cpu() @ K.T) * scale + bias
            pr = torch.softmax(sc, -1) if K.shape[0] else torch.zeros(G, 0)
            outs[b, h * G : (h + 1) * G] = pr @ V if K.shape[0] else 0
            row.append(pr.sum(0))
        cols.append(row)
    T = max(c.numel() for r in cols for c in r)
    col = torch.zeros(B, H, max(T, 1))
    for b, r in enumerate(cols):
        for h, c in enumerate(r):
            col[b, h, : c.numel()] = c
    return outs, col


CASES = {  # n_groups (B, H), tail lengths (B, H), pinned tail tokens (B, H)
    "ragged": ([[3, 1], [0, 5]], [[21, 7], [4, 0]], [[2, 0], [4, 0]]),
    "one slot, long tail": ([[2, 4, 1]], [[40, 33, 17]], [[5, 5, 0]]),
    "nothing sealed": ([[0, 0]], [[9, 30]], [[0, 0]]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout,bits", [("kivi", 2), ("kivi", 4), ("token", 8), ("token", 4)])
def test_ref_matches_brute_force(case, layout, bits):
    n_groups, tails, npin = CASES[case]
    q, s, tail = make_case(n_groups, tails, npin, 32, 64, bits, layout, G=3, with_bias=True)
    want_out, want_col = brute_force(q.cpu(), Sealed(*[t.cpu() if torch.is_tensor(t) else t for t in s]),
                                     Tail(*[t.cpu() for t in tail]), 0.125)
    for chunk in (1, 16):
        out, col = quant_decode_attention_ref(q, s, tail, 0.125, True, chunk=chunk)
        assert_close(out.cpu(), want_out, F32, f"out, chunk {chunk}")
        assert_close(col.cpu(), want_col, F32, f"colsum, chunk {chunk}")


@pytest.mark.parametrize("G", [1, 2, 3, 4, 5])
def test_kernel_gqa_groups(G):
    q, s, tail = make_case(*CASES["ragged"], 32, 64, 4, "kivi", G=G, with_bias=False, seed=G)
    want = quant_decode_attention_ref(q, s, tail, 0.125, True)
    got = quant_decode_attention(q, s, tail, 0.125, True, impl="triton")
    assert_close(got[0], want[0], F32, f"out, G={G}")
    assert_close(got[1], want[1], F32, f"colsum, G={G}")


@pytest.mark.parametrize("GS,bits,layout", [(32, 2, "kivi"), (64, 2, "kivi"), (64, 4, "kivi"), (32, 8, "token"),
                                            (64, 4, "token")])
@pytest.mark.parametrize("colsum", [False, True])
def test_kernel_bits_and_groups(GS, bits, layout, colsum):
    q, s, tail = make_case(*CASES["one slot, long tail"], GS, 64, bits, layout, G=3, with_bias=True, seed=GS + bits)
    want = quant_decode_attention_ref(q, s, tail, 0.125, colsum)
    got = quant_decode_attention(q, s, tail, 0.125, colsum, impl="triton")
    if colsum:
        assert_close(got[0], want[0], F32, "out")
        assert_close(got[1], want[1], F32, "colsum")
    else:
        assert_close(got, want, F32, "out")


@pytest.mark.parametrize("num_splits,tail_splits,block_n", [(1, 1, 16), (2, 3, 16), (7, 1, 32), (3, 2, 64)])
def test_kernel_split_plans(num_splits, tail_splits, block_n):
    """Several blocks per split, several splits per head, the tail split over several programs."""
    q, s, tail = make_case([[6, 2], [3, 0]], [[45, 12], [0, 70]], [[3, 0], [0, 0]], 32, 64, 4, "kivi", G=2,
                           with_bias=True, seed=num_splits)
    want = quant_decode_attention_ref(q, s, tail, 0.125, True)
    got = quant_decode_attention_triton(q, s, tail, 0.125, True, num_splits=num_splits, tail_splits=tail_splits,
                                        block_n=block_n)
    assert_close(got[0], want[0], F32, f"out, {num_splits}+{tail_splits} splits")
    assert_close(got[1], want[1], F32, f"colsum, {num_splits}+{tail_splits} splits")


def test_kernel_empty_heads_give_zeros():
    q, s, tail = make_case([[0, 2]], [[0, 0]], [[0, 0]], 32, 64, 2, "kivi", G=2, with_bias=False)
    out, col = quant_decode_attention(q, s, tail, 0.125, True, impl="triton")
    assert out[0, :2].abs().sum() == 0 and not torch.isnan(out).any()
    assert col[0, 0].abs().sum() == 0
    assert_close(out, quant_decode_attention_ref(q, s, tail, 0.125), F32, "out")
