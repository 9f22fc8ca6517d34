"""cskv's feature rows quantized the KIVI way: the `bits` and `v_bits` parameters of cskv (profile cskv-kivi4).

Not a method of its own: the cskv method picks this format when `bits` is 2 or 4 (`v_bits`, the value
features' bits, defaults to it). A sealed token keeps packed integer codes of its features instead of the
features themselves:
- key features per channel over the group's G tokens (one float16 scale and minimum per feature channel
  per group: KIVI's keys, applied to the rank-r_k features);
- value features per token, `qgroup` feature channels at a time (a float16 scale and minimum per token
  per qgroup channels: KIVI's values).
Asymmetric min-max with kvchat_kernels.kv_quant, as the kivi format; the codes are packed `8 // bits` a
byte and nothing wider is kept for a sealed token (the position: int16 on a model of at most 32,768). The window and pinned tokens stay full precision.
"""

from __future__ import annotations

import torch

from kvchat_kernels.kv_quant import grouped, minmax, pack, unpack_dequantize
from kvchat.methods.cskv import CSKVFormat


class QuantFeatureFormat(CSKVFormat):
    name = "cskv-quant"

    def __init__(self, *args, k_bits: int, v_bits: int, qgroup: int, **kw):
        self.k_bits, self.v_bits, self.qgroup = k_bits, v_bits, qgroup
        super().__init__(*args, **kw)

    def token_specs(self) -> dict:
        return {"ckc": ((self.k_rank * self.k_bits // 8,), torch.uint8),
                "cvc": ((self.v_rank * self.v_bits // 8,), torch.uint8),
                "cvs": ((self.v_rank // self.qgroup,), torch.float16), "cvo": ((self.v_rank // self.qgroup,), torch.float16)}

    def group_specs(self) -> dict:
        return {"cks": ((self.k_rank,), torch.float16), "cko": ((self.k_rank,), torch.float16)}

    def encode_features(self, ck: torch.Tensor, cv: torch.Tensor, count: torch.Tensor) -> tuple[dict, dict]:
        """Features ck (N, G, r_k), cv (N, G, r_v) float32 -> packed codes and value scales (token rows),
        key scales per channel (group rows). Padding rows of a partial group stay out of its key range."""
        N, G, _ = ck.shape
        valid = (torch.arange(G, device=ck.device).view(1, G) < count.view(N, 1).to(ck.device)).unsqueeze(-1)
        kq, ks, km = minmax(ck, self.k_bits, dim=1, valid=valid)
        vq, vs, vm = minmax(grouped(cv, self.qgroup), self.v_bits, dim=-1)
        tok = {"ckc": pack(kq, self.k_bits), "cvc": pack(vq.view(N, G, -1), self.v_bits), "cvs": vs[..., 0], "cvo": vm[..., 0]}
        return tok, {"cks": ks[:, 0], "cko": km[:, 0]}

    def decode_features(self, tok: dict, grp: dict) -> tuple[torch.Tensor, torch.Tensor]:
        ck = unpack_dequantize(tok["ckc"], grp["cks"], grp["cko"], self.k_bits)
        cv = unpack_dequantize(tok["cvc"], tok["cvs"], tok["cvo"], self.v_bits)
        return ck, cv
