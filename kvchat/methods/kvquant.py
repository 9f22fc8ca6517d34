"""kvquant: per-token 8- or 4-bit K/V, the baseline of "Evaluating Quantized LLMs" (https://arxiv.org/abs/2402.18158).

Every token's key and value rows are quantized on their own, in groups of `group` channels along
head_dim (the paper's kv_group_size; 64 = a whole SmolLM2 head), asymmetric min-max with a float16
scale and the paper's integer zero point (one uint8; the range is widened to include 0 so the zero
point is always a code): x ~ (code - zero) * scale. KV8 is near lossless in the paper, KV4 loses a
little and long-context tasks are the most sensitive. Codes are packed 8 // bits a byte.

Because the encoding is per token the format is token-wise: nothing needs a full-precision residual, so
all but `residual` (default 0) tokens past a policy's pinned ones are sealed, `block` at a time into
blocks of `block` tokens, the newest block topped up first. Keys are quantized after RoPE, as the paper's
code does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvchat_kernels.kv_quant import grouped, minmax_zero, pack
from kvchat.cache.quantized import QuantizedFormat, check_shape
from kvchat.methods.base import Method


class KVQuantFormat(QuantizedFormat):
    name = "kvquant"
    token_wise = True

    def __init__(self, *args, channels: int, **kw):
        self.channels = channels
        super().__init__(*args, **kw)

    def token_specs(self) -> dict:
        P, n = self.head_dim * self.bits // 8, self.head_dim // self.channels
        return {"kc": ((P,), torch.uint8), "vc": ((P,), torch.uint8),
                "ks": ((n,), torch.float16), "ko": ((n,), torch.uint8),
                "vs": ((n,), torch.float16), "vo": ((n,), torch.uint8)}

    def encode(self, k, v, pos, count):
        """k, v (N, block, D) -> per token: codes, and a scale and zero point per `channels` channels."""
        N, B, D = k.shape
        kq, ks, kz = minmax_zero(grouped(k, self.channels), self.bits, dim=-1)
        vq, vs, vz = minmax_zero(grouped(v, self.channels), self.bits, dim=-1)
        return {"kc": pack(kq.view(N, B, D), self.bits), "vc": pack(vq.view(N, B, D), self.bits),
                "ks": ks[..., 0], "ko": kz[..., 0], "vs": vs[..., 0], "vo": vz[..., 0]}, {}


@dataclass
class KVQuant(Method):
    name = "kvquant"
    role = "format"
    bits: int = 8
    group: int = 64
    residual: int = 0
    block: int = 16

    def __post_init__(self):
        self._int("bits")
        if self.bits not in (4, 8):
            raise self._err("bits", "must be 4 or 8", self.bits)
        self._int("group", lo=1)
        self._int("residual", lo=0)
        self._int("block", lo=1)

    @classmethod
    def keep_all(cls) -> "KVQuant":
        return cls(group=1, residual=10**9)  # nothing is ever sealed: exactly full (group 1 fits any head)

    def format_layers(self, desc) -> list[int]:
        return list(range(desc.n_layers))

    def make_format(self, layer, n_slots, block_size, desc, with_bias, pinned):
        check_shape("kvquant", self.bits, self.group, desc, "each token is quantized", fix_bits=8)
        return KVQuantFormat(n_slots, desc.n_kv_heads, desc.head_dim, block_size, desc.dtype, desc.device, with_bias,
                             bits=self.bits, channels=self.group, group=self.block, residual=self.residual,
                             pinned=pinned)
