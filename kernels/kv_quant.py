"""Asymmetric min-max quantization of K/V rows, and 2, 4 or 8-bit codes packed into bytes.

Pure torch: a format quantizes when it seals a group (once per `group` tokens) and packing is a few
shifts, so there is no kernel here; the hot path (attention, kernels/quant_attention.py) unpacks and
dequantizes in registers with exactly these conventions. Shared by the quantized formats (KIVI, the
per-token KV8/KV4 baseline) and anything else storing integer codes (CSKV's quantized features).

Conventions:
- codes are integers in [0, 2^bits - 1] held in uint8;
- `minmax(x, bits, dim)` reduces over `dim` (KIVI: keys per channel over tokens, values per token over a
  group of channels): x ~ code * scale + offset, scale and offset (the minimum) in float16. Both are
  rounded to float16 before the codes are computed, in the direction that keeps [min, max] covered (the
  minimum down, the scale up), so every code is the nearest for what is stored: |x - x'| <= scale / 2
  plus float16 rounding of the minimum;
- `minmax_zero(x, bits, dim)`: the evaluation paper's (qllm-eval, AWQ's pseudo-quantizer) integer zero
  point, x ~ (code - zero) * scale with zero in uint8, one byte less than a float16 minimum. The range
  is widened to include 0 so the zero point is always a code (AWQ's formula saturates a row whose values
  all share a sign); |x - x'| <= scale;
- `pack` works along the last dimension: 8 // bits codes a byte, code j of a byte in bits
  [j * bits, (j + 1) * bits).
"""

from __future__ import annotations

import torch

BITS = (2, 4, 8)
F16_MAX = 65504.0


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")


def _f16(x: torch.Tensor, up: bool) -> torch.Tensor:
    """float32 -> float16 rounded toward +inf (up) or -inf, finite."""
    x = x.clamp(-F16_MAX, F16_MAX)
    h = x.half()
    off = h.float() < x if up else h.float() > x
    return torch.where(off, torch.nextafter(h, torch.full_like(h, float("inf") if up else float("-inf"))), h)


def _masked_minmax(x: torch.Tensor, dim: int, valid: torch.Tensor | None):
    x = x.float()
    if valid is None:
        return x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    lo = x.masked_fill(~valid, float("inf")).amin(dim, keepdim=True)
    hi = x.masked_fill(~valid, float("-inf")).amax(dim, keepdim=True)
    empty = torch.isinf(lo)  # nothing valid along dim: any finite scale will do
    return lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)


def minmax(x: torch.Tensor, bits: int, dim: int, valid: torch.Tensor | None = None):
    """x (...) -> codes uint8 (x's shape), scale, minimum float16 (x's shape with `dim` of size 1).

    `valid` (broadcastable to x, bool): entries left out of the min and max (padding rows of a group);
    their codes are clamped, never used."""
    _check_bits(bits)
    qmax = (1 << bits) - 1
    lo, hi = _masked_minmax(x, dim, valid)
    mn = _f16(lo, up=False)
    scale = _f16((hi - mn.float()) / qmax, up=True)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()  # constant rows: code 0 is exact
    codes = torch.round((x.float() - mn.float()) / safe).clamp_(0, qmax).to(torch.uint8)
    return codes, scale, mn


def minmax_zero(x: torch.Tensor, bits: int, dim: int):
    """x (...) -> codes uint8 (x's shape), scale float16, zero uint8 (x's shape with `dim` of size 1)."""
    _check_bits(bits)
    qmax = (1 << bits) - 1
    lo, hi = _masked_minmax(x, dim, None)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = _f16((hi - lo) / qmax, up=True)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    zero = torch.round(-lo / safe).clamp_(0, qmax)
    codes = (torch.round(x.float() / safe) + zero).clamp_(0, qmax).to(torch.uint8)
    return codes, scale, zero.to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """codes (...) with scale/offset broadcastable to them -> x' in `dtype`. A uint8 `offset` is an
    integer zero point ((code - zero) * scale), a float one a minimum (code * scale + min). The
    arithmetic runs in float32, or in `dtype` when that is wider."""
    wide = torch.promote_types(dtype, torch.float32)
    s = scale.to(wide)
    off = -offset.to(wide) * s if offset.dtype == torch.uint8 else offset.to(wide)
    return torch.addcmul(off, codes.to(wide), s).to(dtype)  # one fused pass over the codes


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes uint8 (..., n) in [0, 2^bits) -> (..., n * bits // 8) uint8; n must be a multiple of 8 // bits."""
    _check_bits(bits)
    per = 8 // bits
    n = codes.shape[-1]
    if n % per:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole bytes ({per} a byte)")
    if per == 1:
        return codes.to(torch.uint8)
    c = codes.to(torch.uint8).view(*codes.shape[:-1], n // per, per)
    out = c[..., 0].clone()
    for j in range(1, per):
        out |= c[..., j] << (j * bits)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., m) uint8 -> codes uint8 (..., m * 8 // bits)."""
    _check_bits(bits)
    per = 8 // bits
    if per == 1:
        return packed
    mask = (1 << bits) - 1
    # one shift by a Python int per position: a broadcast tensor of shifts is ~10x slower on CPU
    codes = torch.stack([(packed >> (j * bits)) & mask if j else packed & mask for j in range(per)], dim=-1)
    return codes.view(*packed.shape[:-1], packed.shape[-1] * per)


def unpack_dequantize(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int,
                      dtype=torch.float32) -> torch.Tensor:
    """Packed rows (..., n, P) -> (..., n, D) in `dtype`, D = P * 8 // bits. `scale`/`offset` are either
    (..., D), one per channel shared by the n rows (KIVI keys), or (..., n, D // ch), one per row for
    each group of ch channels (KIVI values, per-token KV8/KV4)."""
    c = unpack(packed, bits)
    D = c.shape[-1]
    if scale.dim() == c.dim() - 1:  # per channel, shared by the rows
        return dequantize(c, scale.unsqueeze(-2), offset.unsqueeze(-2), dtype)
    ch = D // scale.shape[-1]
    x = dequantize(c.view(*c.shape[:-1], -1, ch), scale.unsqueeze(-1), offset.unsqueeze(-1), dtype)
    return x.view(c.shape)


def grouped(x: torch.Tensor, size: int) -> torch.Tensor:
    """(..., D) -> (..., D // size, size): channel groups of the last dim (per-token groups)."""
    D = x.shape[-1]
    if D % size:
        raise ValueError(f"a group of {size} channels does not divide {D}")
    return x.view(*x.shape[:-1], D // size, size)
