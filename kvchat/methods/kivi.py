"""kivi: KIVI, 2- or 4-bit K/V cache, keys per channel, values per token (https://arxiv.org/abs/2402.02750).

Sealed groups of `group` (G) tokens per KV head hold packed integer codes, 8 // bits a byte:
- keys are quantized per channel over the group's G tokens (one float16 scale and minimum per channel
  per group: the outlier channels of keys get their own range);
- values per token, in groups of G channels (a float16 scale and minimum per token per G channels).
Asymmetric min-max; `bits` + 32 / G bits per element. The newest `residual` tokens (R, a multiple of G)
stay in the model's dtype and are sealed a group at a time once R + G of them sit in the tail, so it
holds R to R + G - 1 of them; a policy's pinned tokens (sinks, a compensation token) stay there too.
Eviction keeps a sealed token's codes and its group's scales (no re-quantization).

Deviations from the official code (jy-yuan/KIVI): K and V seal together, a group at a time (KIVI
quantizes keys R at a time and values one token at a time); GQA works without repeating K/V (the
official eager class asserts no GQA); the bytes are held packed, not simulated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvchat_kernels.kv_quant import grouped, minmax, pack
from kvchat.cache.quantized import QuantizedFormat, check_shape
from kvchat.methods.base import Method


class KiviFormat(QuantizedFormat):
    name = "kivi"

    def token_specs(self) -> dict:
        P, n = self.head_dim * self.bits // 8, self.head_dim // self.group
        return {"kc": ((P,), torch.uint8), "vc": ((P,), torch.uint8),
                "vs": ((n,), torch.float16), "vo": ((n,), torch.float16)}

    def group_specs(self) -> dict:
        D = self.head_dim
        return {"ks": ((D,), torch.float16), "ko": ((D,), torch.float16)}

    def encode(self, k, v, pos, count):
        """k, v (N, G, D) -> codes, per-token value scales; per-channel key scales (N, D)."""
        N, G, D = k.shape
        valid = (torch.arange(G, device=k.device).view(1, G) < count.view(N, 1)).unsqueeze(-1)
        kq, ks, km = minmax(k, self.bits, dim=1, valid=valid)  # per channel over the group's tokens
        vq, vs, vm = minmax(grouped(v, self.group), self.bits, dim=-1)  # per token, G channels at a time
        tok = {"kc": pack(kq, self.bits), "vc": pack(vq.view(N, G, D), self.bits), "vs": vs[..., 0], "vo": vm[..., 0]}
        return tok, {"ks": ks[:, 0], "ko": km[:, 0]}


@dataclass
class Kivi(Method):
    name = "kivi"
    role = "format"
    bits: int = 4
    group: int = 32
    residual: int = 32

    def __post_init__(self):
        self._int("bits")
        if self.bits not in (2, 4):
            raise self._err("bits", "must be 2 or 4", self.bits)
        self._int("group", lo=1)
        self._int("residual", lo=0)
        if self.residual % self.group:
            raise self._err("residual", f"must be a multiple of group ({self.group}) (KIVI seals whole groups)",
                            self.residual)

    @classmethod
    def keep_all(cls) -> "Kivi":
        return cls(group=1, residual=10**9)  # nothing is ever sealed: exactly full (group 1 fits any head)

    def format_layers(self, desc) -> list[int]:
        return list(range(desc.n_layers))

    def make_format(self, layer, n_slots, block_size, desc, with_bias, pinned):
        check_shape("kivi", self.bits, self.group, desc, "values are quantized per token", fix_bits=4)
        return KiviFormat(n_slots, desc.n_kv_heads, desc.head_dim, block_size, desc.dtype, desc.device, with_bias,
                          bits=self.bits, group=self.group, residual=self.residual, pinned=pinned)
