"""half: K and V stored as 16-bit floats under a 32-bit model, beside a full-precision tail.

The simplest real format: a token's K and V rows are cast to float16 (or bfloat16) when sealed, half
the bytes of an fp32 cache for those rows, and attention reads them back in the model's dtype. The
`residual` most recent tokens and the policies' pinned tokens (sinks, a compensation token) stay in
fp32; older ones are sealed `group` at a time. Under a model that already runs in 16 bits it would save
nothing, so it refuses to run there. It is also the proof that the format seam carries real storage:
tail, sealed groups, log-sum-exp attention, compaction without re-encoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvchat.cache.sealed import SealedFormat
from kvchat.errors import ProfileError
from kvchat.methods.base import Method

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class HalfFormat(SealedFormat):
    name = "half"

    def __init__(self, *args, store_dtype: torch.dtype, **kw):
        self.store_dtype = store_dtype
        super().__init__(*args, **kw)

    def token_specs(self) -> dict:
        return {"k": ((self.head_dim,), self.store_dtype), "v": ((self.head_dim,), self.store_dtype)}

    def encode(self, k, v, pos, count):
        return {"k": k.to(self.store_dtype), "v": v.to(self.store_dtype)}, {}

    def decode(self, tok, grp, pos):
        return tok["k"].to(self.dtype), tok["v"].to(self.dtype)


@dataclass
class Half(Method):
    name = "half"
    role = "format"
    dtype: str = "float16"
    residual: int = 32
    group: int = 16

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise self._err("dtype", f"must be one of {', '.join(DTYPES)}", self.dtype)
        self._int("residual", lo=0)
        self._int("group", lo=1)

    @classmethod
    def keep_all(cls) -> "Half":
        return cls(residual=10**9)  # nothing is ever sealed: exactly full

    def format_layers(self, desc) -> list[int]:
        return list(range(desc.n_layers))

    def make_format(self, layer, n_slots, block_size, desc, with_bias, pinned):
        sd = DTYPES[self.dtype]
        if torch.empty((), dtype=desc.dtype).element_size() <= 2:
            raise ProfileError(f"half stores K/V as {self.dtype}, but the model already runs in {desc.dtype} "
                               "(half saves nothing there; use --dtype float32, or a quantized format)")
        return HalfFormat(n_slots, desc.n_kv_heads, desc.head_dim, block_size, desc.dtype, desc.device, with_bias,
                          store_dtype=sd, group=self.group, residual=self.residual, pinned=pinned)
