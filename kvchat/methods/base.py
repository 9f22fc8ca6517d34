"""The interface every KV-cache method implements, and parameter checks for their dataclasses.

A method is a dataclass whose fields are its YAML parameters, and it plays one role:
- layout: which layers own storage (`aliases`: a layer reads an earlier layer's store, owns nothing);
- format: how a layer stores a token (`make_format`: dense, quantized, low-rank; at most one per layer);
- policy: which tokens stay (window, pyramid, razor, d2o), acting on the store through `KVStore.compact`,
  before a format seals anything (the engine seals after the policies' hooks).
Every hook is optional (the defaults keep everything), so `full` is a profile with no methods at all.

Hooks, in the order the engine calls them:
    bind(desc, probe)                        once per model: calibration (probe runs the model), schedules
    aliases(desc) -> {layer: source_layer}   layout: layers that read an earlier layer's store
    format_layers(desc) / make_format(...)   format: the layers it stores, and their format objects
    pinned() -> n                            policy: leading tokens per head a tail format keeps unsealed
    prefill_rows(layer) -> w                 attention rows of the chunk's last w queries wanted
    after_prefill_layer(ctx) -> keep | None  per layer during prefill; may drop hidden states
    after_prefill(store, slot)               the chunk (a user turn) is in the store
    decode_colsum(layer) -> bool             column sums of decode attention wanted
    decode_colsum_into(layer) -> buf | None  ... added into the method's running scores (else ctx.colsum)
    on_append(layer, slots, n)               n tokens appended to every head of each slot (owned layers)
    after_decode_layer(ctx)                  per layer during decode (ctx.colsum)
    after_decode(store, slots)               one token appended to every live slot
    on_compact(layer, slot, keep, before)    any method compacted (layer, slot): remap per-token state
    on_free(slot)                            the slot's sequence is gone
    state_lengths(layer, slot) -> [n per head] | None   per-token state held (tests check it follows)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvchat.errors import ProfileError


@dataclass
class PrefillCtx:
    """What a method sees after one layer of a prefill chunk for one slot."""

    layer: int
    slot: int
    store: object  # KVStore
    positions: object  # (T,) original positions of the chunk tokens still in the residual stream
    stats: object  # StepStats of this layer: `rows` follows compactions
    chunk_start: list[int]  # per kv head: storage index where this chunk's tokens begin

    @property
    def rows(self):
        """(H_q, w, L) attention probabilities of the chunk's last w queries, if any method asked for them
        (w is the most any method asked for: use `last_rows(w)` for your own)."""
        return self.stats.rows

    def last_rows(self, w: int):
        """(H_q, w', L) the rows of the chunk's last w queries (w' = w, or fewer when the chunk is shorter),
        or None when none were computed at this layer."""
        rows = self.stats.rows
        return None if rows is None or w <= 0 else rows[:, -w:]


@dataclass
class DecodeCtx:
    """What a method sees after one layer of a decode step."""

    layer: int
    store: object  # KVStore
    slots: list  # the step's slots, in batch order
    stats: object  # StepStats of this layer: `colsum` follows compactions

    @property
    def colsum(self):
        """(B, H_kv, T) attention mass each stored token received this step, if asked for."""
        return self.stats.colsum


def same_tokens(store, layer: int, slot: int) -> bool:
    """Every KV head of (layer, slot) holds the same positions: a policy may then score tokens once for
    the whole layer (another per-head policy may have made the heads differ)."""
    return store.format(layer).same_positions(slot)


def per_layer(scores: torch.Tensor, store, layer: int, slot: int) -> torch.Tensor:
    """(H_kv, L) per-head scores -> every head given the layer's total, so the heads keep one token set;
    unchanged where the heads hold different tokens."""
    if same_tokens(store, layer, slot):
        return scores.sum(0, keepdim=True).expand_as(scores)
    return scores


def neighbour_max(scores: torch.Tensor, pool: int) -> torch.Tensor:
    """(n,) scores -> each token's best score within a centred window of `pool` tokens (odd; 1 = as is):
    SnapKV's pooling, so a selected token keeps its neighbours and a multi-token fact stays whole."""
    if pool <= 1 or not scores.numel():
        return scores
    return F.max_pool1d(scores.view(1, 1, -1), pool, stride=1, padding=pool // 2).view(-1)


class Method:
    name: ClassVar[str] = ""
    role: ClassVar[str] = "policy"  # policy | format | layout

    @classmethod
    def keep_all(cls) -> "Method":
        """An instance whose settings keep everything (a policy that evicts nothing, a lossless format,
        a layout that shares nothing): the test matrix checks it equals `full` token for token."""
        raise NotImplementedError(f"{cls.name} defines no keep-everything settings")

    def bind(self, desc, probe=None) -> None:
        self.desc = desc

    # ---- layout ------------------------------------------------------------------------------------
    def aliases(self, desc) -> dict[int, int]:
        return {}

    # ---- format ------------------------------------------------------------------------------------
    def format_layers(self, desc) -> list[int]:
        return []

    def make_format(self, layer: int, n_slots: int, block_size: int, desc, with_bias: bool, pinned: int):
        raise NotImplementedError

    # ---- policy ------------------------------------------------------------------------------------
    def needs_bias(self) -> bool:
        return False

    def pinned(self) -> int:
        return 0

    def prefill_rows(self, layer: int) -> int:
        return 0

    def after_prefill_layer(self, ctx: PrefillCtx):
        return None

    def after_prefill(self, store, slot: int) -> None:
        pass

    def decode_colsum(self, layer: int) -> bool:
        return False

    def decode_colsum_into(self, layer: int) -> torch.Tensor | None:
        """Where this step's column sums at `layer` go when the method keeps running scores: a float32
        (n_slots, H_kv, cap) contiguous buffer indexed by slot. The engine adds each step slot's sums into
        its row (tokens below cap; the sums are 0 past a head's length) before any `after_decode_layer`
        of the layer runs, in the attention kernel itself when no other method at the layer needs them as
        ctx.colsum (which is then None). Asked after `on_append`, so a buffer grown there is the one used.
        None: the method reads ctx.colsum."""
        return None

    def on_append(self, layer: int, slots: list[int], n: int) -> None:
        """Count n new tokens of `slots` at `layer` (called before the layer's attention; no eviction here)."""

    def after_decode_layer(self, ctx: DecodeCtx) -> None:
        pass

    def decode_barrier(self, layer: int) -> bool:
        """`after_decode_layer(layer)` must run before the next layer computes: it changes something a
        later layer's compute or hook reads beyond this layer's own store and state. Where no method
        needs that, the runner computes a run of layers in one native call and calls their hooks, in
        layer order, after it (a layer whose store a later layer reads always ends a run, so a hook
        that evicts from its own layer needs no barrier of its own). Default: wherever the method has
        an `after_decode_layer`."""
        return type(self).after_decode_layer is not Method.after_decode_layer

    def after_decode(self, store, slots) -> None:
        pass

    def on_compact(self, layer: int, slot: int, keep, before: list[int]) -> None:
        pass

    def on_free(self, slot: int) -> None:
        pass

    def state_lengths(self, layer: int, slot: int) -> list[int] | None:
        return None

    # ---- parameter checks for __post_init__ ----------------------------------------------------------
    def _err(self, key: str, msg: str, value) -> ProfileError:
        return ProfileError(f"{self.name}.{key} {msg}, got {value!r}")

    def _int(self, key: str, lo: int | None = None) -> None:
        v = getattr(self, key)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._err(key, "must be an integer", v)
        if lo is not None and v < lo:
            raise self._err(key, f"must be >= {lo}", v)

    def _pool(self, key: str = "pool") -> None:
        self._int(key, lo=1)
        if getattr(self, key) % 2 == 0:
            raise self._err(key, "must be odd (a window centred on each token)", getattr(self, key))

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
