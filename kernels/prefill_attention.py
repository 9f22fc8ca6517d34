"""Prefill attention for one sequence's chunk against its paged store (the chunk already appended).

    q            (T, H_q, D)      the chunk's queries, T = chunk length
    block_table  (H_kv, max_blocks) int32, lengths (H_kv,) int32: per KV head, including the chunk
Query i of the chunk sees key j of head h iff j < lengths[h] - T + i + 1 (causal, per-head past).
With `last_w > 0` it also returns the attention probabilities of the chunk's last `last_w` queries,
(H_q, last_w, L), computed for those rows only: the full (T, L) matrix is never materialized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvchat_kernels.dispatch import choose_impl


def _gather_seq(pool, block_table, lengths):
    bs = pool.shape[1]
    n_blocks = max(1, -(-int(lengths.max()) // bs))
    g = pool[block_table[:, :n_blocks].long()]  # (H_kv, MB, bs, ...)
    return g.reshape(block_table.shape[0], n_blocks * bs, *pool.shape[2:])


def _visible(lengths, T, L, q_from=0):
    # (H_kv, T - q_from, L) bool: key j visible to chunk query i
    i = torch.arange(q_from, T, device=lengths.device).view(1, -1, 1)
    j = torch.arange(L, device=lengths.device).view(1, 1, L)
    return j < (lengths.view(-1, 1, 1) - T + i + 1)


def prefill_attention_ref(q, k_pool, v_pool, block_table, lengths, scale, bias_pool=None, last_w=0):
    """-> out (T, H_q, D) [, rows (H_q, last_w, L) where L is the longest head in whole blocks]."""
    T, Hq, D = q.shape
    Hkv = block_table.shape[0]
    G = Hq // Hkv
    k = _gather_seq(k_pool, block_table, lengths)  # (H_kv, L, D)
    v = _gather_seq(v_pool, block_table, lengths)
    L = k.shape[1]
    qh = q.transpose(0, 1).unsqueeze(0)  # (1, H_q, T, D)
    lens = lengths.tolist()
    if bias_pool is None and all(n == T for n in lens):
        # First chunk of a sequence: plain causal attention over the chunk itself.
        out = F.scaled_dot_product_attention(
            qh, k[:, :T].unsqueeze(0), v[:, :T].unsqueeze(0), is_causal=True, scale=scale, enable_gqa=True
        )
    else:
        vis = _visible(lengths, T, L)  # (H_kv, T, L)
        if bias_pool is None and len(set(lens)) == 1:
            mask = vis[:1].unsqueeze(0)  # same for every head: (1, 1, T, L)
        else:
            add = torch.zeros(vis.shape, dtype=q.dtype, device=q.device).masked_fill_(~vis, float("-inf"))
            if bias_pool is not None:
                add = add + _gather_seq(bias_pool, block_table, lengths).view(Hkv, 1, L).to(q.dtype)
            mask = add.repeat_interleave(G, dim=0).unsqueeze(0)  # (1, H_q, T, L)
        out = F.scaled_dot_product_attention(qh, k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask, scale=scale, enable_gqa=True)
        if (lengths == 0).any():  # an empty head has no key at all: define its output as zeros
            out = out.nan_to_num(0.0)
    out = out.squeeze(0).transpose(0, 1)  # (T, H_q, D)
    if last_w <= 0:
        return out
    w = min(last_w, T)
    qw = q[T - w :].transpose(0, 1).reshape(Hkv, G * w, D)  # (H_kv, G*w, D): rows of one group together
    scores = torch.matmul(qw, k.transpose(-1, -2)).float().view(Hkv, G, w, L) * scale
    if bias_pool is not None:
        scores = scores + _gather_seq(bias_pool, block_table, lengths).view(Hkv, 1, 1, L).float()
    vis = _visible(lengths, T, L, q_from=T - w).unsqueeze(1)  # (H_kv, 1, w, L)
    probs = torch.softmax(scores.masked_fill(~vis, float("-inf")), dim=-1).nan_to_num_(0.0)
    return out, probs.reshape(Hq, w, L)


def prefill_attention(q, k_pool, v_pool, block_table, lengths, scale, bias_pool=None, last_w=0, impl=None):
    """Dispatcher: the Triton kernel on CUDA, the reference elsewhere."""
    if choose_impl(q.device, impl) == "triton":
        from kvchat_kernels.prefill_attention_triton import prefill_attention_triton

        return prefill_attention_triton(q, k_pool, v_pool, block_table, lengths, scale, bias_pool, last_w)
    return prefill_attention_ref(q, k_pool, v_pool, block_table, lengths, scale, bias_pool, last_w)
