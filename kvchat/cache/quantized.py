"""The base of the quantized formats: sealed groups of packed integer codes with scales and offsets.

A subclass (methods/kivi.py, methods/kvquant.py) names six pools, each a token or a group pool of the
sealed format: `kc`/`vc` packed codes (group, D * bits // 8) uint8, `ks`/`ko` key scales and offsets,
`vs`/`vo` value scales and offsets, in the layouts kvchat_kernels.quant_attention reads (scales per
channel as a group pool, or per token as a token pool; offsets float16 minima or uint8 zero points).
Reading a token dequantizes its group; decode attention runs the quant_attention kernel (the reference
on CPU), which unpacks `chunk` groups at a time, never a layer.
"""

from __future__ import annotations

import torch

from kvchat_kernels.kv_quant import unpack_dequantize
from kvchat_kernels.quant_attention import Sealed, Tail, quant_decode_attention
from kvchat.cache.sealed import SealedFormat
from kvchat.errors import ProfileError

POOLS = ("kc", "ks", "ko", "vc", "vs", "vo")


def check_shape(method: str, bits: int, group: int, desc, groups_of: str, fix_bits: int) -> None:
    """One-line ProfileErrors for a quantizer whose bits or channel groups don't fit the model's heads."""
    D = desc.head_dim
    if D * bits % 8:
        raise ProfileError(f"{method}.bits {bits} cannot pack head_dim {D} of {desc.name} into whole bytes "
                           f"(use bits {fix_bits})")
    if D % group:
        raise ProfileError(f"{method}.group must divide head_dim ({D}) of {desc.name}: {groups_of} in groups of "
                           f"that many channels, got {group}")


class QuantizedFormat(SealedFormat):
    name = "quantized"

    def __init__(self, *args, bits: int, **kw):
        self.bits = bits
        super().__init__(*args, **kw)

    def _pool(self, name: str) -> torch.Tensor:
        return self.tok[name] if name in self.tok else self.grp[name]

    def decode(self, tok, grp, pos):
        rows = {**grp, **tok}
        k = unpack_dequantize(rows["kc"], rows["ks"], rows["ko"], self.bits, self.dtype)
        v = unpack_dequantize(rows["vc"], rows["vs"], rows["vo"], self.bits, self.dtype)
        return k, v

    def sealed_view(self, slots_t: torch.Tensor) -> Sealed:
        """The kernel's view of the step slots' sealed groups."""
        table, counts, n, npin = self.group_tables()
        return Sealed(*(self._pool(p) for p in POOLS[:3]), *(self._pool(p) for p in POOLS[3:]), self.bits,
                      table[slots_t], counts[slots_t], n[slots_t], npin[slots_t])

    def tail_view(self, slots_t: torch.Tensor) -> Tail:
        pages = self.tail.pages
        return Tail(self.tail.k, self.tail.v, pages.table[slots_t], pages.lengths[slots_t], self.tail.bias)

    def attend_decode(self, q, slots, slots_t, scale, colsum=False):
        res = quant_decode_attention(q, self.sealed_view(slots_t), self.tail_view(slots_t), scale, colsum,
                                     chunk=self.chunk_groups)
        return res if colsum else (res, None)
