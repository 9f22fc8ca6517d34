"""Prefill attention for one sequence's chunk against its paged store (the chunk already appended).

    q            (T, H_q, D)      the chunk's queries, T = chunk length
    block_table  (H_kv, max_blocks) int32, lengths (H_kv,) int32: per KV head, including the chunk
    limits       (H_kv, T) int32, optional: query i of the chunk sees key j of head h iff j < limits[h, i]
Causality is by stored position: a caller passes `limits = visible_limits(stored positions, query
positions)`, the count of stored tokens at or before each query's position (stored positions increase
along each head, so the visible keys are a prefix). Without `limits` the chunk is taken to be the last T
tokens of every head, in order: limits[h, i] = lengths[h] - T + i + 1.
With `last_w > 0` it also returns the attention probabilities of the chunk's last `last_w` queries,
(H_q, last_w, L), computed for those rows only: the full (T, L) matrix is never materialized.

The Triton path is flash attention over the paged store: program (row tile, kv head) takes a tile of
the flattened (query, group head) rows of one KV head, so the G query heads of a group share every K/V
tile load, and runs an online softmax over that head's tokens in BLOCK_N steps up to the last key its
rows may see. The last-window rows are two-pass: the main kernel also stores the base-2 log-sum-exp of
those rows, then a second kernel recomputes their logits tile by tile and writes exp2(s - lse).
A query that sees no key at all (empty head, or a head holding fewer tokens than the chunk) outputs 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvchat_kernels.dispatch import choose_impl
from kvchat_kernels.store_ops import index_rows

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - machines without triton use the reference
    triton = None


def _gather_seq(pool, block_table, lengths):
    bs = pool.shape[1]
    n_blocks = max(1, -(-int(lengths.max()) // bs))
    g = index_rows(pool, block_table[:, :n_blocks].reshape(-1).long())  # (H_kv * MB, bs, ...)
    return g.view(block_table.shape[0], n_blocks * bs, *pool.shape[2:])


def index_limits(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(H_kv, T) int32: the chunk is the last T stored tokens of each head, in order."""
    i = torch.arange(T, device=lengths.device, dtype=torch.int32).view(1, T)
    return (lengths.view(-1, 1).to(torch.int32) - T + i + 1).clamp_(min=0)


def visible_limits(stored_pos: torch.Tensor, lengths: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """(H_kv, T) int32: how many of each head's stored tokens sit at or before each query's position.

    stored_pos (H_kv, L) positions in storage order (increasing along each head; entries past a head's
    length are ignored), lengths (H_kv,), q_pos (T,)."""
    H, L = stored_pos.shape
    pad = torch.arange(L, device=stored_pos.device).view(1, L) >= lengths.view(-1, 1)
    pos = stored_pos.to(torch.int64).masked_fill(pad, torch.iinfo(torch.int64).max).contiguous()
    q = q_pos.to(torch.int64).view(1, -1).expand(H, -1).contiguous()
    return torch.searchsorted(pos, q, right=True).to(torch.int32)


def _visible(limits, L, q_from=0):
    # (H_kv, T - q_from, L) bool: key j visible to chunk query i
    j = torch.arange(L, device=limits.device).view(1, 1, L)
    return j < limits[:, q_from:].unsqueeze(-1)


def prefill_attention_ref(q, k_pool, v_pool, block_table, lengths, scale, bias_pool=None, last_w=0, limits=None):
    """-> out (T, H_q, D) [, rows (H_q, last_w, L) where L is the longest head in whole blocks]."""
    T, Hq, D = q.shape
    Hkv = block_table.shape[0]
    G = Hq // Hkv
    k = _gather_seq(k_pool, block_table, lengths).to(q.dtype)  # (H_kv, L, D); a 16-bit store computes in q's dtype
    v = _gather_seq(v_pool, block_table, lengths).to(q.dtype)
    L = k.shape[1]
    qh = q.transpose(0, 1).unsqueeze(0)  # (1, H_q, T, D)
    lens = lengths.tolist()
    default = index_limits(lengths, T)
    if limits is None:
        limits = default
    in_order = torch.equal(limits, default)
    if bias_pool is None and in_order and all(n == T for n in lens):
        # First chunk of a sequence: plain causal attention over the chunk itself.
        out = F.scaled_dot_product_attention(
            qh, k[:, :T].unsqueeze(0), v[:, :T].unsqueeze(0), is_causal=True, scale=scale, enable_gqa=True
        )
    else:
        vis = _visible(limits, L)  # (H_kv, T, L)
        if bias_pool is None and bool((limits == limits[:1]).all()):
            mask = vis[:1].unsqueeze(0)  # same for every head: (1, 1, T, L)
        else:
            add = torch.zeros(vis.shape, dtype=q.dtype, device=q.device).masked_fill_(~vis, float("-inf"))
            if bias_pool is not None:
                add = add + _gather_seq(bias_pool, block_table, lengths).view(Hkv, 1, L).to(q.dtype)
            mask = add.repeat_interleave(G, dim=0).unsqueeze(0)  # (1, H_q, T, L)
        out = F.scaled_dot_product_attention(qh, k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask, scale=scale, enable_gqa=True)
        if bool((limits == 0).any()):  # a query that sees no key at all (empty head, early queries of a
            # head holding fewer tokens than the chunk) has an all -inf row: define its output as zeros
            out = out.nan_to_num(0.0)
    out = out.squeeze(0).transpose(0, 1)  # (T, H_q, D)
    if last_w <= 0:
        return out
    w = min(last_w, T)
    qw = q[T - w :].transpose(0, 1).reshape(Hkv, G * w, D)  # (H_kv, G*w, D): rows of one group together
    scores = torch.matmul(qw, k.transpose(-1, -2)).float().view(Hkv, G, w, L) * scale
    if bias_pool is not None:
        scores = scores + _gather_seq(bias_pool, block_table, lengths).view(Hkv, 1, 1, L).float()
    vis = _visible(limits, L, q_from=T - w).unsqueeze(1)  # (H_kv, 1, w, L)
    probs = torch.softmax(scores.masked_fill(~vis, float("-inf")), dim=-1).nan_to_num_(0.0)
    return out, probs.reshape(Hq, w, L)


_LOG2E = 1.4426950408889634

if triton is not None:

    @triton.jit
    def _prefill_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, len_ptr, lim_ptr, bias_ptr, out_ptr, lse_ptr,
        qk_scale,  # scale * log2(e)
        T, G, D, W,  # W = last_w rows whose lse is kept (0: none); lse buffer (H_q, W) contiguous
        s_qt, s_qh, s_qd,
        s_kb, s_kt, s_kd,
        s_vb, s_vt, s_vd,
        s_bth, s_btm,
        s_l,
        s_mh, s_mt,
        s_xb, s_xt,
        s_ot, s_oh, s_od,
        HAS_BIAS: tl.constexpr, BS: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        hk = tl.program_id(1)
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # flattened (query i, group head g) rows
        i = r // G
        g = r % G
        rmask = i < T
        hq = hk * G + g
        d = tl.arange(0, D_PAD)
        dmask = d < D
        length = tl.load(len_ptr + hk * s_l)
        # keys j < lim are visible to row (i, g): stored tokens at or before the query's position
        lim = tl.load(lim_ptr + hk * s_mh + i * s_mt, mask=rmask, other=0)
        q = tl.load(q_ptr + i[:, None] * s_qt + hq[:, None] * s_qh + d[None, :] * s_qd,
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        kv_end = tl.minimum(tl.max(lim, 0), length)  # the tile's last visible key

        m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc = tl.zeros([BLOCK_R, D_PAD], dtype=tl.float32)
        bt_row = bt_ptr + hk * s_bth
        for t0 in range(0, kv_end, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)
            tmask = t < kv_end
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
            vis = tmask[None, :] & (t[None, :] < lim[:, None])
            qk = tl.where(vis, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
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

        seen = l_i > 0.0
        l_div = tl.where(seen, l_i, 1.0)
        o = tl.where(seen[:, None], acc / l_div[:, None], 0.0)  # no visible key: zeros, not NaN
        tl.store(out_ptr + i[:, None] * s_ot + hq[:, None] * s_oh + d[None, :] * s_od,
                 o.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
        if W > 0:
            wi = i - (T - W)
            lse = tl.where(seen, m_i + tl.log2(l_div), float("-inf"))
            tl.store(lse_ptr + hq * W + wi, lse, mask=rmask & (wi >= 0))

    @triton.jit
    def _prefill_rows_kernel(
        q_ptr, k_ptr, bt_ptr, len_ptr, lim_ptr, bias_ptr, lse_ptr, rows_ptr,
        qk_scale,
        T, G, D, W, L,
        s_qt, s_qh, s_qd,
        s_kb, s_kt, s_kd,
        s_bth, s_btm,
        s_l,
        s_mh, s_mt,
        s_xb, s_xt,
        s_rh, s_rw, s_rl,
        HAS_BIAS: tl.constexpr, BS: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        pid_n = tl.program_id(1)
        hk = tl.program_id(2)
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # flattened (window row wi, group head g)
        wi = r // G
        g = r % G
        rmask = wi < W
        i = T - W + wi
        hq = hk * G + g
        d = tl.arange(0, D_PAD)
        dmask = d < D
        length = tl.load(len_ptr + hk * s_l)
        lim = tl.load(lim_ptr + hk * s_mh + i * s_mt, mask=rmask, other=0)
        q = tl.load(q_ptr + i[:, None] * s_qt + hq[:, None] * s_qh + d[None, :] * s_qd,
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        lse = tl.load(lse_ptr + hq * W + wi, mask=rmask, other=float("-inf"))
        t = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tmask = t < length
        blk = tl.load(bt_ptr + hk * s_bth + (t // BS) * s_btm, mask=tmask, other=0).to(tl.int64)
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
        vis = rmask[:, None] & tmask[None, :] & (t[None, :] < lim[:, None])
        p = tl.where(vis, tl.exp2(qk - tl.where(vis, lse[:, None], 0.0)), 0.0)
        tl.store(rows_ptr + hq[:, None] * s_rh + wi[:, None] * s_rw + t[None, :] * s_rl, p,
                 mask=rmask[:, None] & (t[None, :] < L))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def prefill_attention_triton(q, k_pool, v_pool, block_table, lengths, scale, bias_pool=None, last_w=0,
                             limits=None, block_r=64, block_n=64):
    """Flash attention of one chunk over its paged store; `block_r` / `block_n` are tile sizes (>= 16)."""
    T, Hq, D = q.shape
    Hkv = block_table.shape[0]
    if Hq % Hkv:
        raise ValueError(f"H_q={Hq} is not a multiple of H_kv={Hkv}")
    G = Hq // Hkv
    bs = k_pool.shape[1]
    dev = q.device
    D_PAD = max(16, triton.next_power_of_2(D))
    ieee = q.dtype == torch.float32
    has_bias = bias_pool is not None
    bias = bias_pool if has_bias else k_pool  # dummy pointer, never read
    s_xb, s_xt = (bias_pool.stride(0), bias_pool.stride(1)) if has_bias else (0, 0)
    w = min(last_w, T) if last_w > 0 else 0
    lim = (index_limits(lengths, T) if limits is None else limits).to(torch.int32).contiguous()
    out = torch.empty((T, Hq, D), dtype=q.dtype, device=dev)
    lse = torch.empty((Hq, max(w, 1)), dtype=torch.float32, device=dev)
    if T > 0:
        _prefill_kernel[(_cdiv(T * G, block_r), Hkv)](
            q, k_pool, v_pool, block_table, lengths, lim, bias, out, lse,
            scale * _LOG2E,
            T, G, D, w,
            q.stride(0), q.stride(1), q.stride(2),
            k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
            v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
            block_table.stride(0), block_table.stride(1),
            lengths.stride(0),
            lim.stride(0), lim.stride(1),
            s_xb, s_xt,
            out.stride(0), out.stride(1), out.stride(2),
            HAS_BIAS=has_bias, BS=bs, D_PAD=D_PAD, BLOCK_R=block_r, BLOCK_N=block_n, IEEE=ieee,
            num_warps=4, num_stages=2,
        )
    if last_w <= 0:
        return out
    L = max(1, _cdiv(int(lengths.max()), bs)) * bs  # the reference's width: longest head in whole blocks
    rows = torch.empty((Hq, w, L), dtype=torch.float32, device=dev)
    if w > 0:
        _prefill_rows_kernel[(_cdiv(w * G, block_r), _cdiv(L, block_n), Hkv)](
            q, k_pool, block_table, lengths, lim, bias, lse, rows,
            scale * _LOG2E,
            T, G, D, w, L,
            q.stride(0), q.stride(1), q.stride(2),
            k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
            block_table.stride(0), block_table.stride(1),
            lengths.stride(0),
            lim.stride(0), lim.stride(1),
            s_xb, s_xt,
            rows.stride(0), rows.stride(1), rows.stride(2),
            HAS_BIAS=has_bias, BS=bs, D_PAD=D_PAD, BLOCK_R=block_r, BLOCK_N=block_n, IEEE=ieee,
            num_warps=4,
        )
    return out, rows


def prefill_attention(q, k_pool, v_pool, block_table, lengths, scale, bias_pool=None, last_w=0, limits=None,
                      impl=None):
    """Dispatcher: the Triton kernel on CUDA, the reference elsewhere."""
    if choose_impl(q.device, impl) == "triton":
        return prefill_attention_triton(q, k_pool, v_pool, block_table, lengths, scale, bias_pool, last_w, limits)
    return prefill_attention_ref(q, k_pool, v_pool, block_table, lengths, scale, bias_pool, last_w, limits)
