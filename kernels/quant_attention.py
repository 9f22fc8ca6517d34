"""Decode attention over a quantized store: packed sealed groups beside a full-precision paged tail.

Layout (shared with kvchat's sealed formats, kvchat/cache/sealed.py):
    Sealed: one group = one block of GS tokens of one KV head, in storage order per (slot, head)
        kc, vc   (n_blocks, GS, D * bits // 8) uint8  codes packed along head_dim (kv_quant.pack)
        ks, ko   key scales / offsets: (n_blocks, D), one per channel over the group's tokens (KIVI),
                 or (n_blocks, GS, D // k_ch), per token in groups of k_ch channels (KV8/KV4)
        vs, vo   (n_blocks, GS, D // v_ch) value scales / offsets, per token
                 offsets are float16 minima (x = c * s + m) or uint8 zero points (x = (c - z) * s)
        table, counts (B, H_kv, MG) int32  group ids and tokens held in each; n (B, H_kv) groups;
        npin (B, H_kv) tail tokens that come before the sealed ones in storage order (sinks)
    Tail: the paged dense pools of paged_attention.py (k, v, table, lengths, optional bias)
Storage order of a (slot, head): [tail[:npin]][sealed groups, `counts` tokens each][tail[npin:]].

The Triton path is split-K like paged_attention.py: program (slot, kv head, split) walks a range of that
head's groups for all query heads of its GQA group (K/V never repeated), loading the packed bytes and
the group's scales, unpacking and dequantizing in registers; the tail's tokens are more splits of the
same kernel; the log-sum-exp merge is paged_attention's. Column sums are a second pass over K. The
reference dequantizes `chunk` groups at a time (never a whole layer) and is what CPUs run. The Triton
kernels are in quant_attention_triton.py (this file holds the layout, the reference and the dispatcher).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kvchat_kernels.dispatch import choose_impl
from kvchat_kernels.store_ops import index_rows
from kvchat_kernels.kv_quant import unpack_dequantize



class Sealed(NamedTuple):
    kc: torch.Tensor
    ks: torch.Tensor
    ko: torch.Tensor
    vc: torch.Tensor
    vs: torch.Tensor
    vo: torch.Tensor
    bits: int
    table: torch.Tensor
    counts: torch.Tensor
    n: torch.Tensor
    npin: torch.Tensor


class Tail(NamedTuple):
    k: torch.Tensor
    v: torch.Tensor
    table: torch.Tensor
    lengths: torch.Tensor
    bias: torch.Tensor | None = None


def _channels(scale: torch.Tensor, D: int) -> int:
    """Channels sharing one scale: 1 for per-channel (2-D pool), else D // groups per token."""
    return 1 if scale.dim() == 2 else D // scale.shape[-1]


def dequant_groups(s: Sealed, ids: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Block ids (...) -> k, v (..., GS, D) in dtype."""
    flat = ids.reshape(-1)
    rows = [index_rows(t, flat) for t in s[:6]]  # index_select gathers rows ~3x faster than indexing
    rows = [r.view(*ids.shape, *r.shape[1:]) for r in rows]
    k = unpack_dequantize(*rows[:3], s.bits, dtype)
    v = unpack_dequantize(*rows[3:], s.bits, dtype)
    return k, v


def storage_positions(s: Sealed, tail_len: int):
    """Storage index of (sealed group j, row t): npin + start_j + t; of tail token t: t below npin, else
    t + sealed tokens. -> (group starts (B, H, MG), tail index map (B, H, tail_len))."""
    cnt = s.counts.long()
    start = s.npin.long().unsqueeze(-1) + cnt.cumsum(-1) - cnt
    ns = cnt.sum(-1, keepdim=True)
    t = torch.arange(tail_len, device=cnt.device).view(1, 1, -1)
    return start, torch.where(t < s.npin.long().unsqueeze(-1), t, t + ns)


class _Online:
    """Running softmax of one set of queries over parts seen one after another (flash-attention's
    recurrence): m the max so far, l the sum of exp(s - m), acc the unnormalized output."""

    def __init__(self, shape, D, device):
        self.m = torch.full(shape, float("-inf"), device=device)
        self.l = torch.zeros(shape, device=device)
        self.acc = torch.zeros(*shape, D, device=device)

    def add(self, scores: torch.Tensor, v: torch.Tensor) -> None:
        m = torch.maximum(self.m, scores.amax(-1))
        m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # nothing seen yet: stays 0
        alpha = torch.exp(self.m - m_safe)
        p = torch.exp(scores - m_safe.unsqueeze(-1))
        self.l = self.l * alpha + p.sum(-1)
        self.acc = self.acc * alpha.unsqueeze(-1) + torch.matmul(p.to(v.dtype), v).float()
        self.m = m

    def result(self):
        """-> out (..., D) float32 (zeros where nothing was visible), lse (...) (+inf there: p = 0)."""
        seen = self.l > 0
        l = torch.where(seen, self.l, torch.ones_like(self.l))
        out = torch.where(seen.unsqueeze(-1), self.acc / l.unsqueeze(-1), 0.0)
        return out, torch.where(seen, self.m + torch.log(l), float("inf"))


def quant_decode_attention_ref(q, s: Sealed, tail: Tail, scale, return_colsum=False, chunk=16):
    """q (B, H_q, D) -> out (B, H_q, D) [, colsum (B, H_kv, T)]; T = the longest (slot, head) in storage
    order, columns in storage order (0 past a head's length). Sealed groups dequantize `chunk` at a time
    and leave nothing behind but their scores (kept only for column sums)."""
    B, Hq, D = q.shape
    H = tail.table.shape[1]
    G = Hq // H
    qg = q.view(B, H, G, D)
    bs = tail.k.shape[1]
    n_blocks = max(1, -(-int(tail.lengths.max()) // bs))
    bt = tail.table[:, :, :n_blocks].reshape(-1).long()
    kt = index_rows(tail.k, bt).view(B, H, -1, D).to(q.dtype)
    vt = index_rows(tail.v, bt).view(B, H, -1, D).to(q.dtype)
    Tt = kt.shape[2]
    st = torch.matmul(qg, kt.transpose(-1, -2)).float() * scale  # (B, H, G, Tt)
    if tail.bias is not None:
        st = st + index_rows(tail.bias, bt).view(B, H, 1, Tt).float()
    st = st.masked_fill(torch.arange(Tt, device=q.device).view(1, 1, 1, Tt) >= tail.lengths.view(B, H, 1, 1),
                        float("-inf"))
    run = _Online((B, H, G), D, q.device)
    run.add(st, vt)
    scores = [(st, None)]
    GS = s.kc.shape[1]
    max_groups = int(s.n.max()) if s.n.numel() else 0
    for c0 in range(0, max_groups, chunk):
        ids = s.table[:, :, c0 : c0 + chunk].long()  # (B, H, C)
        C = ids.shape[-1]
        k, v = dequant_groups(s, ids, q.dtype)  # (B, H, C, GS, D)
        valid = torch.arange(GS, device=q.device).view(1, 1, 1, GS) < s.counts[:, :, c0 : c0 + C, None]
        sc = torch.matmul(qg, k.view(B, H, C * GS, D).transpose(-1, -2)).float() * scale
        sc = sc.masked_fill(~valid.view(B, H, 1, C * GS), float("-inf"))
        run.add(sc, v.view(B, H, C * GS, D))
        if return_colsum:
            scores.append((sc, (c0, C)))
    out, lse = run.result()
    out = out.to(q.dtype).view(B, Hq, D)
    if not return_colsum:
        return out
    start, tail_at = storage_positions(s, Tt)
    T = max(1, int((s.counts.sum(-1) + tail.lengths).max()))
    col = torch.zeros(B, H, T + 1, device=q.device)  # column T collects what lies past a head's length
    ar = torch.arange(GS, device=q.device)
    for sc, where in scores:
        pr = torch.exp(sc - lse.unsqueeze(-1)).sum(2)  # (B, H, n) over the group's query heads
        if where is None:
            idx = tail_at.masked_fill(torch.arange(Tt, device=q.device).view(1, 1, -1) >= tail.lengths.unsqueeze(-1), T)
        else:
            c0, C = where
            ok = ar < s.counts[:, :, c0 : c0 + C, None]
            idx = (start[:, :, c0 : c0 + C, None] + ar).masked_fill(~ok, T).view(B, H, -1)
        col.scatter_add_(2, idx, pr)
    return out, col[:, :, :T]


# ---- Triton ----------------------------------------------------------------------------------------------
def quant_decode_attention(q, sealed: Sealed, tail: Tail, scale, return_colsum=False, impl=None, chunk=16):
    """Dispatcher: the Triton split-K kernel on CUDA, the reference elsewhere (`chunk` groups at a time)."""
    if choose_impl(q.device, impl) == "triton":
        from kvchat_kernels.quant_attention_triton import quant_decode_attention_triton

        return quant_decode_attention_triton(q, sealed, tail, scale, return_colsum)
    return quant_decode_attention_ref(q, sealed, tail, scale, return_colsum, chunk=chunk)
