"""Decode attention: one query token per slot against that slot's paged K/V, per KV head.

Layout (shared with kvchat's store):
    k_pool, v_pool  (n_blocks, block_size, D)    one block holds block_size tokens of one KV head
    block_table     (B, H_kv, max_blocks) int32  block ids of each (slot, kv head), unused entries 0
    lengths         (B, H_kv) int32              tokens stored per (slot, kv head); 0 = empty head
    bias_pool       (n_blocks, block_size) f32   optional additive logit per stored token
GQA: query head h reads KV head h // (H_q // H_kv); K/V are never repeated.

The Triton path is split-K: program (slot, kv head, split) reads one range of that head's tokens for
all G query heads of the group at once (K/V loaded once per group, never repeated) and writes a partial
running max / sum / unnormalized output; a merge kernel combines the splits by log-sum-exp, so a few
long sequences still occupy the whole GPU. Column sums (for methods that score tokens by attention
received) need the final normalizer of every query head, which only exists after the merge, so they are
a second pass that re-reads K: one more read of K (not V) per step, paid only when asked for, instead of
writing every split's unnormalized probabilities out and rescaling them.
"""

from __future__ import annotations

import torch

from kvchat_kernels import cpu
from kvchat_kernels.dispatch import choose_impl
from kvchat_kernels.store_ops import index_rows

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - machines without triton use the reference
    triton = None


def _gather(pool: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    # (B, H_kv, MB) block ids -> (B, H_kv, MB * block_size, ...). index_select copies whole blocks
    # 3-7x faster than advanced indexing on CPU, and takes the int32 table as it is (index_rows: and
    # float32 as fast as the rest).
    g = index_rows(pool, bt.reshape(-1))
    return g.view(*bt.shape[:2], -1, *pool.shape[2:])


def paged_decode_attention_ref(q, k_pool, v_pool, block_table, lengths, scale, bias_pool=None, return_colsum=False,
                               max_len=None, min_len=None):
    """q (B, H_q, D) -> out (B, H_q, D) [, colsum (B, H_kv, T) summed over each group's query heads].

    T is the longest head rounded up to whole blocks; columns past a head's length are 0 in colsum.
    An empty head (length 0) attends to nothing and outputs zeros.
    `max_len` / `min_len`: the longest and shortest head, when the caller knows them (the store keeps
    lengths on the host), so nothing is read back from `lengths`; when they are equal no per-head mask
    is built and `lengths` is not read at all (it may be None). Only the live blocks are gathered.
    This is the CPU decode path as well as the oracle, so it is written for few ops: a decode step runs
    it once per layer.
    """
    B, Hq, D = q.shape
    Hkv = block_table.shape[1]
    G = Hq // Hkv
    bs = k_pool.shape[1]
    if max_len is None:
        max_len = int(lengths.max()) if lengths.numel() else 0
    if min_len is None:
        min_len = int(lengths.min()) if lengths.numel() else 0
    n_blocks = max(1, -(-max_len // bs))
    bt = block_table[:, :, :n_blocks]
    k, v = _gather(k_pool, bt), _gather(v_pool, bt)  # (B, H_kv, T, D)
    if k.dtype != q.dtype:  # a 16-bit store under a 32-bit model computes in q's dtype
        k, v = k.to(q.dtype), v.to(q.dtype)
    T = k.shape[2]
    k, v = k.view(B * Hkv, T, D), v.view(B * Hkv, T, D)
    scores = torch.bmm(q.reshape(B * Hkv, G, D), k.transpose(1, 2))  # (B * H_kv, G, T)
    if scores.dtype != torch.float32:
        scores = scores.float()
    scores.mul_(scale)
    if bias_pool is not None:
        scores += _gather(bias_pool, bt).view(B * Hkv, 1, T)
    if min_len != max_len:
        invalid = torch.arange(T, device=q.device).view(1, 1, T) >= lengths.view(B * Hkv, 1, 1)
        scores.masked_fill_(invalid, float("-inf"))
    elif max_len < T:  # every head holds max_len tokens: only the last block's tail is masked
        scores[..., max_len:] = float("-inf")
    probs = torch.softmax(scores, dim=-1)
    if min_len == 0:
        probs = probs.nan_to_num_(0.0)  # empty head: all -inf -> NaN -> 0
    out = torch.bmm(probs if probs.dtype == v.dtype else probs.to(v.dtype), v).view(B, Hq, D)
    if return_colsum:
        return out, probs.view(B, Hkv, G, T).sum(dim=2)
    return out


def paged_decode_attention_cpu(q, k_pool, v_pool, block_table, lengths, scale, bias_pool=None, return_colsum=False,
                               max_len=None, min_len=None):
    """The CPU decode path without the native ops: the reference, or for one slot whose blocks fill most
    of the pool, attention over the whole pool without gathering K and V.

    One slot's blocks are most of a trimmed pool, so two plain matmuls over the pool read every K and V
    row once: scores of all query heads against every pooled token (the other heads' blocks cost
    compute, not memory), each head's own blocks picked from the small score matrix, and the
    probabilities scattered back to pool order (zeros elsewhere) for the matmul with V. The gather
    copies K and V and reads them again; at 2k tokens this is ~1.3x (bf16) to ~2.5x (fp32) faster over
    30 layers, at 512 tokens no faster, so it is used from 1,024 tokens on. Same contract as the ref.
    """
    B, Hq, D = q.shape
    Hkv = block_table.shape[1]
    bs, N = k_pool.shape[1], k_pool.shape[0]
    if max_len is None:
        max_len = int(lengths.max()) if lengths.numel() else 0
    if min_len is None:
        min_len = int(lengths.min()) if lengths.numel() else 0
    n_blocks = max(1, -(-max_len // bs))
    if B != 1 or max_len < 1024 or min_len == 0 or N > 1.5 * Hkv * n_blocks or k_pool.dtype != q.dtype:
        return paged_decode_attention_ref(q, k_pool, v_pool, block_table, lengths, scale, bias_pool, return_colsum,
                                          max_len=max_len, min_len=min_len)
    G, T = Hq // Hkv, n_blocks * bs
    bt = block_table[0, :, :n_blocks].long()  # (H_kv, NB)
    heads = torch.arange(Hkv, device=q.device).view(Hkv, 1)
    s = torch.mm(q.view(Hq, D), k_pool.view(N * bs, D).t()).view(Hkv, G, N, bs)
    s = s[heads, :, bt]  # (H_kv, NB, G, bs): each head's own blocks
    s = s.permute(0, 2, 1, 3).reshape(Hkv, G, T)
    if s.dtype != torch.float32:
        s = s.float()
    s.mul_(scale)
    if bias_pool is not None:
        s += bias_pool[bt].view(Hkv, 1, T)
    if min_len != max_len:
        s.masked_fill_(torch.arange(T, device=q.device).view(1, 1, T) >= lengths.view(Hkv, 1, 1), float("-inf"))
    elif max_len < T:
        s[..., max_len:] = float("-inf")
    probs = torch.softmax(s, dim=-1)  # (H_kv, G, T)
    p_pool = torch.zeros(Hkv, G, N, bs, dtype=v_pool.dtype, device=q.device)
    p_pool[heads, :, bt] = probs.to(v_pool.dtype).view(Hkv, G, n_blocks, bs).permute(0, 2, 1, 3)
    out = torch.mm(p_pool.view(Hq, N * bs), v_pool.view(N * bs, D)).view(1, Hq, D)
    if return_colsum:
        return out, probs.sum(dim=1).view(1, Hkv, T)
    return out


_LOG2E = 1.4426950408889634

if triton is not None:

    @triton.jit
    def _decode_partial_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, len_ptr, bias_ptr,
        m_ptr, l_ptr, acc_ptr,  # partials: m, l (B, H_q, S) f32; acc (B, H_q, S, D) f32, contiguous
        qk_scale,  # scale * log2(e): the softmax runs in base 2
        H_kv, G, D, S, TOK_PER_SPLIT,
        s_qb, s_qh, s_qd,
        s_kb, s_kt, s_kd,
        s_vb, s_vt, s_vd,
        s_btb, s_bth, s_btm,
        s_lb, s_lh,
        s_xb, s_xt,
        HAS_BIAS: tl.constexpr, BS: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        b = pid_bh // H_kv
        hk = pid_bh % H_kv
        length = tl.load(len_ptr + b * s_lb + hk * s_lh)
        start = split * TOK_PER_SPLIT
        end = tl.minimum(start + TOK_PER_SPLIT, length)

        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D_PAD)
        gmask = g < G
        dmask = d < D
        hq = hk * G + g
        q = tl.load(q_ptr + b * s_qb + hq[:, None] * s_qh + d[None, :] * s_qd,
                    mask=gmask[:, None] & dmask[None, :], other=0.0)

        m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([G_PAD], dtype=tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], dtype=tl.float32)
        bt_row = bt_ptr + b * s_btb + hk * s_bth
        for t0 in range(start, end, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)
            tmask = t < end
            blk = tl.load(bt_row + (t // BS) * s_btm, mask=tmask, other=0).to(tl.int64)
            off = t % BS
            kvmask = tmask[:, None] & dmask[None, :]
            k = tl.load(k_ptr + blk[:, None] * s_kb + off[:, None] * s_kt + d[None, :] * s_kd, mask=kvmask, other=0.0)
            k = k.to(q.dtype)  # a 16-bit store under a 32-bit model computes in the model's dtype
            if IEEE:
                qk = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
            qk = qk * qk_scale
            if HAS_BIAS:
                bias = tl.load(bias_ptr + blk * s_xb + off * s_xt, mask=tmask, other=0.0).to(tl.float32)
                qk = qk + bias[None, :] * 1.4426950408889634
            qk = tl.where(tmask[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet stays 0
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(qk - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + blk[:, None] * s_vb + off[:, None] * s_vt + d[None, :] * s_vd, mask=kvmask, other=0.0)
            v = v.to(q.dtype)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        row = (b * H_kv * G + hq) * S + split  # (b, hq, split) in a contiguous (B, H_q, S) buffer
        tl.store(m_ptr + row, m_i, mask=gmask)
        tl.store(l_ptr + row, l_i, mask=gmask)
        tl.store(acc_ptr + row[:, None].to(tl.int64) * D + d[None, :], acc, mask=gmask[:, None] & dmask[None, :])

    @triton.jit
    def _decode_merge_kernel(
        m_ptr, l_ptr, acc_ptr, out_ptr, lse_ptr,
        H_q, D, S,
        s_ob, s_oh, s_od,
        S_PAD: tl.constexpr, D_PAD: tl.constexpr,
    ):
        pid = tl.program_id(0)  # b * H_q + hq
        b = pid // H_q
        hq = pid % H_q
        s = tl.arange(0, S_PAD)
        d = tl.arange(0, D_PAD)
        smask = s < S
        dmask = d < D
        m = tl.load(m_ptr + pid * S + s, mask=smask, other=float("-inf"))
        l = tl.load(l_ptr + pid * S + s, mask=smask, other=0.0)
        m_max = tl.max(m, 0)
        m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
        w = tl.exp2(m - m_safe)  # empty splits (m = -inf) weigh 0
        l_tot = tl.sum(l * w, 0)
        acc = tl.load(acc_ptr + (pid * S + s)[:, None].to(tl.int64) * D + d[None, :],
                      mask=smask[:, None] & dmask[None, :], other=0.0)
        o = tl.sum(acc * w[:, None], 0)
        nonempty = l_tot > 0.0
        o = tl.where(nonempty, o / tl.where(nonempty, l_tot, 1.0), 0.0)  # empty head: zeros, not NaN
        tl.store(out_ptr + b * s_ob + hq * s_oh + d * s_od, o.to(out_ptr.dtype.element_ty), mask=dmask)
        lse = tl.where(nonempty, m_safe + tl.log2(tl.where(nonempty, l_tot, 1.0)), float("-inf"))
        tl.store(lse_ptr + pid, lse)  # base-2 log-sum-exp of the scaled logits

    @triton.jit
    def _decode_colsum_kernel(
        q_ptr, k_ptr, bt_ptr, len_ptr, bias_ptr, lse_ptr, col_ptr,
        qk_scale,
        H_kv, G, D, TOK_PER_SPLIT,
        s_qb, s_qh, s_qd,
        s_kb, s_kt, s_kd,
        s_btb, s_bth, s_btm,
        s_lb, s_lh,
        s_xb, s_xt,
        s_cb, s_ch, s_ct,
        HAS_BIAS: tl.constexpr, BS: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        b = pid_bh // H_kv
        hk = pid_bh % H_kv
        length = tl.load(len_ptr + b * s_lb + hk * s_lh)
        start = split * TOK_PER_SPLIT
        end = tl.minimum(start + TOK_PER_SPLIT, length)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D_PAD)
        gmask = g < G
        dmask = d < D
        hq = hk * G + g
        q = tl.load(q_ptr + b * s_qb + hq[:, None] * s_qh + d[None, :] * s_qd,
                    mask=gmask[:, None] & dmask[None, :], other=0.0)
        lse = tl.load(lse_ptr + b * H_kv * G + hq, mask=gmask, other=float("-inf"))
        bt_row = bt_ptr + b * s_btb + hk * s_bth
        for t0 in range(start, end, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)
            tmask = t < end
            blk = tl.load(bt_row + (t // BS) * s_btm, mask=tmask, other=0).to(tl.int64)
            off = t % BS
            k = tl.load(k_ptr + blk[:, None] * s_kb + off[:, None] * s_kt + d[None, :] * s_kd,
                        mask=tmask[:, None] & dmask[None, :], other=0.0).to(q.dtype)
            if IEEE:
                qk = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
            qk = qk * qk_scale
            if HAS_BIAS:
                bias = tl.load(bias_ptr + blk * s_xb + off * s_xt, mask=tmask, other=0.0).to(tl.float32)
                qk = qk + bias[None, :] * 1.4426950408889634
            valid = gmask[:, None] & tmask[None, :]
            p = tl.where(valid, tl.exp2(qk - tl.where(valid, lse[:, None], 0.0)), 0.0)
            tl.store(col_ptr + b * s_cb + hk * s_ch + t * s_ct, tl.sum(p, 0), mask=tmask)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int, at_least: int = 16) -> int:
    # tl.dot needs every dimension >= 16; padded rows/columns are masked
    return max(at_least, triton.next_power_of_2(max(int(n), 1)))


def _plan_splits(max_len: int, n_heads: int, device: torch.device, block_n: int) -> tuple[int, int]:
    """(num_splits, tokens per split): enough (slot, head, split) programs to fill the GPU, each split a
    whole number of BLOCK_N tiles and at least 4 of them, at most 64 splits (the merge reads them all)."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8  # the interpreter: a few splits so the merge is exercised
    tiles = max(1, _cdiv(max_len, block_n))
    splits = max(1, min(_cdiv(target, max(n_heads, 1)), _cdiv(tiles, 4), 64))
    tok = _cdiv(tiles, splits) * block_n
    return _cdiv(max(max_len, 1), tok), tok


def paged_decode_attention_triton(q, k_pool, v_pool, block_table, lengths, scale, bias_pool=None,
                                  return_colsum=False, num_splits=None, block_n=64, max_len=None):
    """Split-K paged decode attention. `num_splits` / `block_n` override the plan (tests, tuning);
    `max_len` (the longest head, known on the host) spares the device read-back."""
    B, Hq, D = q.shape
    Hkv = block_table.shape[1]
    if Hq % Hkv:
        raise ValueError(f"H_q={Hq} is not a multiple of H_kv={Hkv}")
    G = Hq // Hkv
    bs = k_pool.shape[1]
    dev = q.device
    if max_len is None:  # one host sync: the plan and T depend on it
        max_len = int(lengths.max()) if lengths.numel() else 0
    if num_splits is None:
        S, tok = _plan_splits(max_len, B * Hkv, dev, block_n)
    else:
        tok = _cdiv(_cdiv(max(max_len, 1), num_splits), block_n) * block_n
        S = _cdiv(max(max_len, 1), tok)
    G_PAD, D_PAD = _pow2(G), _pow2(D)
    ieee = q.dtype == torch.float32  # fp32 in, fp32 math: no TF32 rounding of the logits
    has_bias = bias_pool is not None
    bias = bias_pool if has_bias else k_pool  # dummy pointer, never read
    s_xb, s_xt = (bias_pool.stride(0), bias_pool.stride(1)) if has_bias else (0, 0)

    m = torch.empty((B, Hq, S), dtype=torch.float32, device=dev)
    l = torch.empty((B, Hq, S), dtype=torch.float32, device=dev)
    acc = torch.empty((B, Hq, S, D), dtype=torch.float32, device=dev)
    grid = (B * Hkv, S)
    _decode_partial_kernel[grid](
        q, k_pool, v_pool, block_table, lengths, bias,
        m, l, acc,
        scale * _LOG2E,
        Hkv, G, D, S, tok,
        q.stride(0), q.stride(1), q.stride(2),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
        block_table.stride(0), block_table.stride(1), block_table.stride(2),
        lengths.stride(0), lengths.stride(1),
        s_xb, s_xt,
        HAS_BIAS=has_bias, BS=bs, G_PAD=G_PAD, D_PAD=D_PAD, BLOCK_N=block_n, IEEE=ieee,
        num_warps=4,
    )
    out = torch.empty((B, Hq, D), dtype=q.dtype, device=dev)
    lse = torch.empty((B, Hq), dtype=torch.float32, device=dev)
    _decode_merge_kernel[(B * Hq,)](
        m, l, acc, out, lse,
        Hq, D, S,
        out.stride(0), out.stride(1), out.stride(2),
        S_PAD=triton.next_power_of_2(S), D_PAD=triton.next_power_of_2(D),
        num_warps=4,
    )
    if not return_colsum:
        return out
    T = max(1, _cdiv(max_len, bs)) * bs
    col = torch.zeros((B, Hkv, T), dtype=torch.float32, device=dev)  # zeros past each head's length
    _decode_colsum_kernel[grid](
        q, k_pool, block_table, lengths, bias, lse, col,
        scale * _LOG2E,
        Hkv, G, D, tok,
        q.stride(0), q.stride(1), q.stride(2),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        block_table.stride(0), block_table.stride(1), block_table.stride(2),
        lengths.stride(0), lengths.stride(1),
        s_xb, s_xt,
        col.stride(0), col.stride(1), col.stride(2),
        HAS_BIAS=has_bias, BS=bs, G_PAD=G_PAD, D_PAD=D_PAD, BLOCK_N=block_n, IEEE=ieee,
        num_warps=4,
    )
    return out, col


def paged_decode_attention(q, k_pool, v_pool, block_table, lengths, scale, bias_pool=None, return_colsum=False, impl=None,
                           max_len=None, min_len=None):
    """Dispatcher: the Triton split-K kernel on CUDA, kernels/cpu.py's native attention on a CPU that has
    it, `paged_decode_attention_cpu` elsewhere. `max_len` / `min_len`: the longest and shortest head when the caller knows them on the host (see the reference)."""
    mode = choose_impl(q.device, impl)
    if mode == "triton":
        if lengths is None:
            raise ValueError("the Triton decode kernel needs the lengths tensor")
        return paged_decode_attention_triton(q, k_pool, v_pool, block_table, lengths, scale, bias_pool, return_colsum,
                                             max_len=max_len)
    if mode == "native" and cpu.decode_attention_ok(q, k_pool, v_pool, block_table, lengths, max_len, min_len):
        return cpu.decode_attention(q, k_pool, v_pool, block_table, lengths, scale, bias_pool, return_colsum,
                                    max_len=max_len, min_len=min_len)
    return paged_decode_attention_cpu(q, k_pool, v_pool, block_table, lengths, scale, bias_pool, return_colsum,
                                      max_len=max_len, min_len=min_len)
