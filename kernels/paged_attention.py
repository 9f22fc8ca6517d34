"""Decode attention: one query token per slot against that slot's paged K/V, per KV head.

Layout (shared with kvchat's store):
    k_pool, v_pool  (n_blocks, block_size, D)    one block holds block_size tokens of one KV head
    block_table     (B, H_kv, max_blocks) int32  block ids of each (slot, kv head), unused entries 0
    lengths         (B, H_kv) int32              tokens stored per (slot, kv head); 0 = empty head
    bias_pool       (n_blocks, block_size) f32   optional additive logit per stored token
GQA: query head h reads KV head h // (H_q // H_kv); K/V are never repeated.
"""

from __future__ import annotations

import torch

from kvchat_kernels.dispatch import choose_impl


def _gather(pool: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    # (B, H_kv, MB) block ids -> (B, H_kv, MB * block_size, ...)
    g = pool[bt.long()]
    return g.reshape(*bt.shape[:2], -1, *pool.shape[2:])


def paged_decode_attention_ref(q, k_pool, v_pool, block_table, lengths, scale, bias_pool=None, return_colsum=False):
    """q (B, H_q, D) -> out (B, H_q, D) [, colsum (B, H_kv, T) summed over each group's query heads].

    T is the longest head rounded up to whole blocks; columns past a head's length are 0 in colsum.
    An empty head (length 0) attends to nothing and outputs zeros.
    """
    B, Hq, D = q.shape
    Hkv = block_table.shape[1]
    G = Hq // Hkv
    bs = k_pool.shape[1]
    n_blocks = max(1, -(-int(lengths.max()) // bs)) if lengths.numel() else 1
    bt = block_table[:, :, :n_blocks]
    k = _gather(k_pool, bt)  # (B, H_kv, T, D)
    v = _gather(v_pool, bt)
    T = k.shape[2]
    scores = torch.matmul(q.view(B, Hkv, G, D), k.transpose(-1, -2)).float() * scale  # (B, H_kv, G, T)
    if bias_pool is not None:
        scores = scores + _gather(bias_pool, bt).view(B, Hkv, 1, T).float()
    invalid = torch.arange(T, device=q.device).view(1, 1, 1, T) >= lengths.view(B, Hkv, 1, 1)
    scores = scores.masked_fill(invalid, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # empty head: all -inf -> NaN -> 0
    out = torch.matmul(probs.to(v.dtype), v).view(B, Hq, D)
    if return_colsum:
        return out, probs.sum(dim=2)
    return out


def paged_decode_attention(q, k_pool, v_pool, block_table, lengths, scale, bias_pool=None, return_colsum=False, impl=None):
    """Dispatcher: the Triton split-K kernel on CUDA, the reference elsewhere."""
    if choose_impl(q.device, impl) == "triton":
        from kvchat_kernels.paged_attention_triton import paged_decode_attention_triton

        return paged_decode_attention_triton(q, k_pool, v_pool, block_table, lengths, scale, bias_pool, return_colsum)
    return paged_decode_attention_ref(q, k_pool, v_pool, block_table, lengths, scale, bias_pool, return_colsum)
