"""The Triton split-K decode kernel over a quantized store (layout and reference: quant_attention.py).

Program (slot, kv head, split) walks a range of that head's sealed groups for all query heads of its GQA
group, unpacking and dequantizing the packed codes in registers; the full-precision tail's tokens are
more splits of the same kernel; paged_attention's merge kernel combines them by log-sum-exp. Column sums
are a second pass over K.
"""

from __future__ import annotations

import torch

from kvchat_kernels.quant_attention import Sealed, Tail, _channels

try:
    import triton
    import triton.language as tl

    from kvchat_kernels.paged_attention import _decode_merge_kernel
except Exception:  # pragma: no cover - machines without triton use the reference
    triton = None

_LOG2E = 1.4426950408889634

if triton is not None:

    @triton.jit
    def _dequant_tile(c_ptr, s_ptr, o_ptr, blk, t, d, mask, s_cg, s_ct, s_sg, s_st,
                      BITS: tl.constexpr, CH: tl.constexpr, ZERO: tl.constexpr):
        """Rows t, channels d of group `blk` -> float32 (len(t), len(d)), unpacked and dequantized here."""
        PER: tl.constexpr = 8 // BITS
        byte = tl.load(c_ptr + blk * s_cg + t[:, None] * s_ct + (d // PER)[None, :], mask=mask, other=0)
        code = ((byte.to(tl.int32) >> ((d % PER) * BITS)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
        at = blk * s_sg + t[:, None] * s_st + (d // CH)[None, :]  # s_st = 0: one scale per channel
        sc = tl.load(s_ptr + at, mask=mask, other=0.0).to(tl.float32)
        off = tl.load(o_ptr + at, mask=mask, other=0).to(tl.float32)
        if ZERO:
            x = (code - off) * sc
        else:
            x = code * sc + off
        return x

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE:  # fp32 in, fp32 math: no TF32 rounding
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _tail_tile(tk_ptr, tx_ptr, trow, t0, t_end, d, dmask, s_tkb, s_tkt, s_txb, s_txt,
                   BS: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr):
        """Tokens [t0, t0 + BLOCK_N) of the paged tail: (token mask, row offsets into k/v, K rows, bias
        in base-2 logits or 0)."""
        tt = t0 + tl.arange(0, BLOCK_N)
        tmask = tt < t_end
        blk = tl.load(trow + tt // BS, mask=tmask, other=0).to(tl.int64)
        off = tt % BS
        rows = blk[:, None] * s_tkb + off[:, None] * s_tkt + d[None, :]
        k = tl.load(tk_ptr + rows, mask=tmask[:, None] & dmask[None, :], other=0.0)
        bias = tl.zeros([BLOCK_N], dtype=tl.float32)
        if HAS_BIAS:
            bias = tl.load(tx_ptr + blk * s_txb + off * s_txt, mask=tmask, other=0.0).to(tl.float32) * 1.4426950408889634
        return tt, tmask, rows, k, bias

    @triton.jit
    def _online(m_i, l_i, acc, qk, v, IEEE: tl.constexpr):
        """One tile of the running softmax in base 2: qk (G, N) with -inf where invalid, v (N, D)."""
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet stays 0
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        return m_new, l_i * alpha + tl.sum(p, 1), acc

    @triton.jit
    def _ranges(split, S_G, GRP_PER_SPLIT, TOK_PER_SPLIT, n_groups, tail_len):
        """A split's sealed groups [g0, g1) and tail tokens [t0, t1): sealed splits come first, then
        the tail's; the other range of a split is empty."""
        g0 = split * GRP_PER_SPLIT
        g1 = tl.where(split < S_G, tl.minimum(g0 + GRP_PER_SPLIT, n_groups), g0)
        t0 = tl.maximum(split - S_G, 0) * TOK_PER_SPLIT
        t1 = tl.where(split >= S_G, tl.minimum(t0 + TOK_PER_SPLIT, tail_len), 0)
        return g0, g1, tl.where(split >= S_G, t0, 0), t1

    @triton.jit
    def _quant_partial_kernel(
        q_ptr, kc_ptr, ks_ptr, ko_ptr, vc_ptr, vs_ptr, vo_ptr, gt_ptr, gc_ptr, ng_ptr,
        tk_ptr, tv_ptr, tt_ptr, tl_ptr, tx_ptr,
        m_ptr, l_ptr, acc_ptr,  # partials: m, l (B, H_q, S) f32; acc (B, H_q, S, D) f32, contiguous
        qk_scale, H_kv, G, D, S, S_G, GRP_PER_SPLIT, TOK_PER_SPLIT,
        s_qb, s_qh,
        s_cg, s_ct, s_ksg, s_kst, s_vsg, s_vst,
        s_gb, s_gh, s_nb, s_nh,
        s_tkb, s_tkt, s_ttb, s_tth, s_tlb, s_tlh, s_txb, s_txt,
        BITS: tl.constexpr, K_CH: tl.constexpr, V_CH: tl.constexpr, ZERO: tl.constexpr,
        HAS_BIAS: tl.constexpr, BS: tl.constexpr, GS_PAD: tl.constexpr, G_PAD: tl.constexpr,
        D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        b = pid_bh // H_kv
        hk = pid_bh % H_kv
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D_PAD)
        gmask = g < G
        dmask = d < D
        hq = hk * G + g
        q = tl.load(q_ptr + b * s_qb + hq[:, None] * s_qh + d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)
        m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([G_PAD], dtype=tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], dtype=tl.float32)
        g0, g1, t_start, t_end = _ranges(split, S_G, GRP_PER_SPLIT, TOK_PER_SPLIT,
                                         tl.load(ng_ptr + b * s_nb + hk * s_nh), tl.load(tl_ptr + b * s_tlb + hk * s_tlh))

        t = tl.arange(0, GS_PAD)
        row = b * s_gb + hk * s_gh
        for j in range(g0, g1):  # sealed groups: one group a tile
            blk = tl.load(gt_ptr + row + j).to(tl.int64)
            tmask = t < tl.load(gc_ptr + row + j)
            mask = tmask[:, None] & dmask[None, :]
            k = _dequant_tile(kc_ptr, ks_ptr, ko_ptr, blk, t, d, mask, s_cg, s_ct, s_ksg, s_kst, BITS, K_CH, ZERO)
            qk = tl.where(tmask[None, :], _dot(q, tl.trans(k.to(q.dtype)), IEEE) * qk_scale, float("-inf"))
            v = _dequant_tile(vc_ptr, vs_ptr, vo_ptr, blk, t, d, mask, s_cg, s_ct, s_vsg, s_vst, BITS, V_CH, ZERO)
            m_i, l_i, acc = _online(m_i, l_i, acc, qk, v.to(q.dtype), IEEE)

        trow = tt_ptr + b * s_ttb + hk * s_tth
        for t0 in range(t_start, t_end, BLOCK_N):  # the full-precision tail
            tt, tmask, rows, k, bias = _tail_tile(tk_ptr, tx_ptr, trow, t0, t_end, d, dmask, s_tkb, s_tkt, s_txb, s_txt,
                                                  BS, BLOCK_N, HAS_BIAS)
            qk = _dot(q, tl.trans(k.to(q.dtype)), IEEE) * qk_scale + bias[None, :]
            qk = tl.where(tmask[None, :], qk, float("-inf"))
            v = tl.load(tv_ptr + rows, mask=tmask[:, None] & dmask[None, :], other=0.0)
            m_i, l_i, acc = _online(m_i, l_i, acc, qk, v.to(q.dtype), IEEE)

        out_row = (b * H_kv * G + hq) * S + split
        tl.store(m_ptr + out_row, m_i, mask=gmask)
        tl.store(l_ptr + out_row, l_i, mask=gmask)
        tl.store(acc_ptr + out_row[:, None].to(tl.int64) * D + d[None, :], acc, mask=gmask[:, None] & dmask[None, :])

    @triton.jit
    def _quant_colsum_kernel(
        q_ptr, kc_ptr, ks_ptr, ko_ptr, gt_ptr, gc_ptr, ng_ptr, gs_ptr,
        tk_ptr, tt_ptr, tl_ptr, tx_ptr, np_ptr, ns_ptr,
        lse_ptr, col_ptr,
        qk_scale, H_kv, G, D, S_G, GRP_PER_SPLIT, TOK_PER_SPLIT,
        s_qb, s_qh,
        s_cg, s_ct, s_ksg, s_kst,
        s_gb, s_gh, s_nb, s_nh,
        s_tkb, s_tkt, s_ttb, s_tth, s_tlb, s_tlh, s_txb, s_txt,
        s_cb, s_ch,
        BITS: tl.constexpr, K_CH: tl.constexpr, ZERO: tl.constexpr,
        HAS_BIAS: tl.constexpr, BS: tl.constexpr, GS_PAD: tl.constexpr, G_PAD: tl.constexpr,
        D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    ):
        """Second pass: each stored token's probability summed over its group's query heads, written at
        its storage index ([pinned][sealed][recent]); re-reads K only."""
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        b = pid_bh // H_kv
        hk = pid_bh % H_kv
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D_PAD)
        gmask = g < G
        dmask = d < D
        hq = hk * G + g
        q = tl.load(q_ptr + b * s_qb + hq[:, None] * s_qh + d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)
        lse = tl.load(lse_ptr + b * H_kv * G + hq, mask=gmask, other=float("-inf"))
        col = col_ptr + b * s_cb + hk * s_ch
        at_h = b * s_nb + hk * s_nh
        g0, g1, t_start, t_end = _ranges(split, S_G, GRP_PER_SPLIT, TOK_PER_SPLIT, tl.load(ng_ptr + at_h),
                                         tl.load(tl_ptr + b * s_tlb + hk * s_tlh))

        t = tl.arange(0, GS_PAD)
        row = b * s_gb + hk * s_gh
        for j in range(g0, g1):
            blk = tl.load(gt_ptr + row + j).to(tl.int64)
            tmask = t < tl.load(gc_ptr + row + j)
            k = _dequant_tile(kc_ptr, ks_ptr, ko_ptr, blk, t, d, tmask[:, None] & dmask[None, :], s_cg, s_ct, s_ksg,
                              s_kst, BITS, K_CH, ZERO)
            qk = _dot(q, tl.trans(k.to(q.dtype)), IEEE) * qk_scale
            valid = gmask[:, None] & tmask[None, :]
            p = tl.where(valid, tl.exp2(qk - tl.where(valid, lse[:, None], 0.0)), 0.0)
            tl.store(col + tl.load(gs_ptr + row + j) + t, tl.sum(p, 0), mask=tmask)  # from the group's first index

        npin = tl.load(np_ptr + at_h)
        n_sealed = tl.load(ns_ptr + at_h)
        trow = tt_ptr + b * s_ttb + hk * s_tth
        for t0 in range(t_start, t_end, BLOCK_N):
            tt, tmask, rows, k, bias = _tail_tile(tk_ptr, tx_ptr, trow, t0, t_end, d, dmask, s_tkb, s_tkt, s_txb, s_txt,
                                                  BS, BLOCK_N, HAS_BIAS)
            qk = _dot(q, tl.trans(k.to(q.dtype)), IEEE) * qk_scale + bias[None, :]
            valid = gmask[:, None] & tmask[None, :]
            p = tl.where(valid, tl.exp2(qk - tl.where(valid, lse[:, None], 0.0)), 0.0)
            tl.store(col + tl.where(tt < npin, tt, tt + n_sealed), tl.sum(p, 0), mask=tmask)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int, at_least: int = 16) -> int:
    return max(at_least, triton.next_power_of_2(max(int(n), 1)))


def _plan(max_groups: int, max_tail: int, n_heads: int, device, block_n: int, num_splits=None, tail_splits=None):
    """(sealed splits, groups per split, tail splits, tail tokens per split): enough programs to fill
    the GPU, at most 64 splits in all (the merge reads them all)."""
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    want = max(1, _cdiv(target, max(n_heads, 1)))
    if num_splits is None:
        num_splits = min(want, max(1, _cdiv(max_groups, 2)), 48)
    gps = max(1, _cdiv(max_groups, max(num_splits, 1)))
    s_g = _cdiv(max_groups, gps)
    if tail_splits is None:
        tail_splits = min(max(1, _cdiv(max_tail, 4 * block_n)), 64 - s_g)
    tok = _cdiv(_cdiv(max(max_tail, 1), tail_splits), block_n) * block_n
    return s_g, gps, _cdiv(max(max_tail, 1), tok), tok


def _strides_2or3(t: torch.Tensor) -> tuple[int, int]:
    """(group stride, token stride): a per-channel pool (n, D) has no token stride."""
    return (t.stride(0), 0) if t.dim() == 2 else (t.stride(0), t.stride(1))


def quant_decode_attention_triton(q, s: Sealed, tail: Tail, scale, return_colsum=False, num_splits=None,
                                  tail_splits=None, block_n=32):
    B, Hq, D = q.shape
    H = tail.table.shape[1]
    if Hq % H:
        raise ValueError(f"H_q={Hq} is not a multiple of H_kv={H}")
    for name, t in (("q", q), *zip(Sealed._fields[:6], s[:6]), ("tail.k", tail.k), ("tail.v", tail.v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    G = Hq // H
    GS = s.kc.shape[1]
    dev = q.device
    max_groups = int(s.n.max()) if s.n.numel() else 0
    max_tail = int(tail.lengths.max()) if tail.lengths.numel() else 0
    s_g, gps, s_t, tok = _plan(max_groups, max_tail, B * H, dev, block_n, num_splits, tail_splits)
    S = s_g + s_t
    k_ch, v_ch = _channels(s.ks, D), _channels(s.vs, D)
    zero = s.ko.dtype == torch.uint8
    has_bias = tail.bias is not None
    bias = tail.bias if has_bias else tail.k
    s_x = (tail.bias.stride(0), tail.bias.stride(1)) if has_bias else (0, 0)
    (s_ksg, s_kst), (s_vsg, s_vst) = _strides_2or3(s.ks), _strides_2or3(s.vs)
    table, counts = s.table.contiguous(), s.counts.contiguous()
    common = dict(BITS=s.bits, ZERO=zero, HAS_BIAS=has_bias, BS=tail.k.shape[1], GS_PAD=_pow2(GS),
                  G_PAD=_pow2(G), D_PAD=_pow2(D), BLOCK_N=block_n, IEEE=q.dtype == torch.float32, num_warps=4)
    m = torch.empty((B, Hq, S), dtype=torch.float32, device=dev)
    l = torch.empty((B, Hq, S), dtype=torch.float32, device=dev)
    acc = torch.empty((B, Hq, S, D), dtype=torch.float32, device=dev)
    grid = (B * H, S)
    _quant_partial_kernel[grid](
        q, s.kc, s.ks, s.ko, s.vc, s.vs, s.vo, table, counts, s.n,
        tail.k, tail.v, tail.table, tail.lengths, bias,
        m, l, acc,
        scale * _LOG2E, H, G, D, S, s_g, gps, tok,
        q.stride(0), q.stride(1),
        s.kc.stride(0), s.kc.stride(1), s_ksg, s_kst, s_vsg, s_vst,
        table.stride(0), table.stride(1), s.n.stride(0), s.n.stride(1),
        tail.k.stride(0), tail.k.stride(1), tail.table.stride(0), tail.table.stride(1),
        tail.lengths.stride(0), tail.lengths.stride(1), *s_x,
        K_CH=k_ch, V_CH=v_ch, **common,
    )
    out = torch.empty((B, Hq, D), dtype=q.dtype, device=dev)
    lse = torch.empty((B, Hq), dtype=torch.float32, device=dev)
    _decode_merge_kernel[(B * Hq,)](
        m, l, acc, out, lse, Hq, D, S, out.stride(0), out.stride(1), out.stride(2),
        S_PAD=triton.next_power_of_2(S), D_PAD=triton.next_power_of_2(D), num_warps=4,
    )
    if not return_colsum:
        return out
    cnt = counts.long()
    n_sealed = cnt.sum(-1)
    first = (s.npin.long().unsqueeze(-1) + cnt.cumsum(-1) - cnt).to(torch.int32).contiguous()
    T = max(1, int((n_sealed + tail.lengths.long()).max()))
    col = torch.zeros((B, H, T), dtype=torch.float32, device=dev)
    npin = s.npin.to(torch.int32).contiguous()
    n_sealed = n_sealed.to(torch.int32).contiguous()
    ng = s.n.contiguous()
    _quant_colsum_kernel[grid](
        q, s.kc, s.ks, s.ko, table, counts, ng, first,
        tail.k, tail.table, tail.lengths, bias, npin, n_sealed,
        lse, col,
        scale * _LOG2E, H, G, D, s_g, gps, tok,
        q.stride(0), q.stride(1),
        s.kc.stride(0), s.kc.stride(1), s_ksg, s_kst,
        table.stride(0), table.stride(1), ng.stride(0), ng.stride(1),
        tail.k.stride(0), tail.k.stride(1), tail.table.stride(0), tail.table.stride(1),
        tail.lengths.stride(0), tail.lengths.stride(1), *s_x,
        col.stride(0), col.stride(1),
        K_CH=k_ch, **common,
    )
    return out, col
