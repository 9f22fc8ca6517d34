"""The interface every KV-cache method implements, and parameter checks for their dataclasses.

A method is a dataclass whose fields are its YAML parameters. The engine calls its hooks; every hook
is optional (the defaults keep everything), so `full` is a profile with no methods at all.

Hooks, in the order the engine calls them:
    bind(desc, lm, progress)                 once per model: calibration, per-layer schedules
    aliases(desc) -> {layer: source_layer}   layers that read another layer's store (KVSharer)
    prefill_rows(layer) -> w                 attention rows of the chunk's last w queries wanted
    after_prefill_layer(ctx) -> keep | None  per layer during prefill; may drop hidden states
    after_prefill(store, slot)               the chunk (a user turn) is in the store
    decode_colsum(layer) -> bool             column sums of decode attention wanted
    after_decode_layer(layer, store, slots, colsum)
    after_decode(store, slots)               one token appended to every live slot
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from kvchat.errors import ProfileError


@dataclass
class PrefillCtx:
    """What a method sees after one layer of a prefill chunk for one slot."""

    layer: int
    slot: int
    store: object  # KVStore
    positions: object  # (T,) original positions of the chunk tokens still in the residual stream
    rows: object | None  # (H_q, w, L) attention probabilities of the last w queries, if asked for
    chunk_start: list[int]  # per kv head: storage index where this chunk's tokens begin


class Method:
    name: ClassVar[str] = ""

    def bind(self, desc, lm=None, progress=None) -> None:
        self.desc = desc

    def aliases(self, desc) -> dict[int, int]:
        return {}

    def needs_bias(self) -> bool:
        return False

    def prefill_rows(self, layer: int) -> int:
        return 0

    def after_prefill_layer(self, ctx: PrefillCtx):
        return None

    def after_prefill(self, store, slot: int) -> None:
        pass

    def decode_colsum(self, layer: int) -> bool:
        return False

    def after_decode_layer(self, layer: int, store, slots, colsum) -> None:
        pass

    def after_decode(self, store, slots) -> None:
        pass

    # ---- parameter checks for __post_init__ ----------------------------------------------------------
    def _err(self, key: str, msg: str, value) -> ProfileError:
        return ProfileError(f"{self.name}.{key} {msg}, got {value!r}")

    def _int(self, key: str, lo: int | None = None) -> None:
        v = getattr(self, key)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._err(key, "must be an integer", v)
        if lo is not None and v < lo:
            raise self._err(key, f"must be >= {lo}", v)

    def _float(self, key: str, lo: float | None = None, hi: float | None = None, lo_open=False) -> None:
        v = getattr(self, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self._err(key, "must be a number", v)
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise self._err(key, f"must be {'>' if lo_open else '>='} {lo}", v)
        if hi is not None and v > hi:
            raise self._err(key, f"must be <= {hi}", v)
        setattr(self, key, float(v))

    @classmethod
    def params(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
