"""Attention helpers the formats share: a sequence's first chunk, and the log-sum-exp merge of parts.

A format that stores tokens in several parts (a full-precision tail beside sealed blocks) attends to
each part on its own and merges the partial results exactly, as the split-K decode kernel merges its
splits: with m_i the running max and l_i the sum of exp(s - m_i) of part i,
    out = sum_i exp(m_i - m) acc_i / sum_i exp(m_i - m) l_i,   m = max_i m_i.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from kvchat_kernels import cpu


def causal_attention(q, k, v, scale, last_w=0):
    """A sequence's first chunk, straight from its K/V: q (T, H_q, D), k/v (T, H_kv, D).

    Same contract as `prefill_attention` with an empty store: -> out (T, H_q, D), rows (H_q, w, T) | None."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    if q.device.type == "cpu" and cpu.causal_attention_ok(q, k, v):  # bfloat16 with AVX512-BF16: ~2x torch's
        out = cpu.causal_attention(q, k, v, scale)
    else:
        out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                                             v.transpose(0, 1).unsqueeze(0), is_causal=True, scale=scale,
                                             enable_gqa=True)[0].transpose(0, 1)
    if last_w <= 0:
        return out, None
    w = min(last_w, T)
    G = Hq // Hkv
    qw = q[T - w :].transpose(0, 1).reshape(Hkv, G * w, D)
    scores = torch.matmul(qw, k.permute(1, 2, 0)).float().view(Hkv, G, w, T) * scale
    causal = torch.arange(T).view(1, T) <= torch.arange(T - w, T).view(w, 1)
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    return out, probs.reshape(Hq, w, T)


class Part(NamedTuple):
    """One part's unnormalized attention: m (...,) running max, l (...,) sum of exp(s - m), acc (..., D)."""

    m: torch.Tensor
    l: torch.Tensor
    acc: torch.Tensor


def partial(scores: torch.Tensor, v: torch.Tensor) -> Part:
    """scores (..., n) float32 with -inf where a key is not visible; v (..., n, D) -> Part."""
    m = scores.amax(-1)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(scores - m_safe.unsqueeze(-1))
    return Part(m_safe.masked_fill(torch.isinf(m), float("-inf")), p.sum(-1), torch.matmul(p.to(v.dtype), v).float())


def merge(parts: list[Part]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> out (..., D) float32 (zeros where nothing was visible), lse (...,) natural-log log-sum-exp."""
    m = torch.stack([p.m for p in parts]).amax(0)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    l = sum(p.l * torch.exp(p.m - m_safe) for p in parts)
    acc = sum(p.acc * torch.exp(p.m - m_safe).unsqueeze(-1) for p in parts)
    seen = l > 0
    out = torch.where(seen.unsqueeze(-1), acc / torch.where(seen, l, torch.ones_like(l)).unsqueeze(-1), 0.0)
    lse = torch.where(seen, m_safe + torch.log(torch.where(seen, l, torch.ones_like(l))), float("-inf"))
    return out, lse
