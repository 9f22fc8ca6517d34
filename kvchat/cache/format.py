"""The storage format protocol: how one layer holds the tokens of every slot.

A format owns its pools and answers five things for the engine and the methods:

    append_chunk(slot, k_pre, k, v, pos)          T new tokens of one slot (k_pre: keys before RoPE,
    append_step(slots, slots_t, k_pre, k, v, pos)   k: after RoPE), one token for each of B slots
    attend_prefill(q, slot, q_pos, scale, last_w, fresh) -> (out, rows | None)
    attend_decode(q, slots, slots_t, scale, colsum) -> (out, colsum | None)
    read / write / compact                          tokens in storage order, per (slot, kv head)
    similar / compact(slot, keep, merge)            an eviction with merges in place (`native_evict`)
    read_heads / read_many / write_many             the same for several heads of a slot at once
    seal(slots)                                     after the step's policies ran (tail formats)
    bytes_held() / bytes_held_slot(slot) / bytes_reserved()

Storage order is per (slot, kv head): index 0 is the oldest token still held. `host[slot][head]` is
each head's length as a Python int. Statistics come back in storage order: prefill `rows` (H_q, w, L)
are the attention probabilities of the chunk's last w queries, decode `colsum` (B, H_kv, T) the
probability mass each stored token received from the step's query heads of its group (0 past a
head's length). `read` returns keys after RoPE and values in the model's dtype whatever the storage
(dequantized, reconstructed), so policies score and merge tokens without knowing the format; `write`
takes the same, and a format that encodes tokens re-encodes what is written.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Tokens(NamedTuple):
    """Some stored tokens of one (slot, kv head): k, v (n, D) in the model's dtype, keys after RoPE;
    pos (n,) int32 original positions; bias (n,) float32 additive logits, None when the store keeps
    none."""

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    bias: torch.Tensor | None = None

    def select(self, idx: torch.Tensor) -> "Tokens":
        return Tokens(self.k[idx], self.v[idx], self.pos[idx], None if self.bias is None else self.bias[idx])


class Merge(NamedTuple):
    """Evicted tokens folded into kept ones as a compaction drops them (D2O), for formats with
    `native_evict`: every head keeps C of its n tokens (keep (H, C)); gone (H, n - C) the others' storage
    indices; into (H, n - C) the index into keep of the token each joins; w (H, n - C) float32 weights, 0 =
    dropped unmerged. A kept token that something joins becomes (self_w x kept + sum w x joined) /
    (self_w + sum w), keys and values alike; the others are unchanged. self_w: one weight, or (H,) one per
    head. `heads`: the merge covers these KV heads only (keep, gone, into, w and a per-head self_w have a
    row per listed head; the compaction's keep lists still name every head, the others keeping all)."""

    gone: torch.Tensor
    into: torch.Tensor
    w: torch.Tensor
    self_w: float | torch.Tensor
    heads: list[int] | None = None


class Format:
    """Base class: what every format shares. Subclasses implement the storage and attention."""

    name = "format"

    def __init__(self, n_slots: int, n_kv: int, head_dim: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, with_bias: bool = False):
        self.n_slots, self.n_kv, self.head_dim, self.block_size = n_slots, n_kv, head_dim, block_size
        self.dtype, self.device, self.with_bias = dtype, device, with_bias

    # Lengths as Python ints, [slot][head]; subclasses point this at their bookkeeping.
    host: list[list[int]]

    # kernels/cpu_layer.c runs a whole decode layer on this format's store (DenseFormat: CPU pools in the
    # model's dtype); the others take the per-op path.
    native_layer = False
    # `similar` and `compact(..., merge)` run natively on this format's store (DenseFormat on the CPU).
    native_evict = False

    def seal(self, slots: list[int]) -> None:
        """Called once a step's policies have run: a format with a full-precision tail seals what is
        old enough now. Policies act before this, so eviction never touches a token twice."""

    def trim(self) -> None:
        """Give back pool storage that eviction left unused."""

    def reposition(self, slot: int, new_pos, rotate) -> None:
        """Give every stored token of `slot` the position `new_pos(old positions)` and re-rotate its key
        (`rotate(k, old, new)`): a conversation past the model's positions goes on (StreamingLLM's
        positions within the cache). A format storing keys before RoPE only rewrites positions."""
        for h in range(self.n_kv):
            t = self.read(slot, h)
            if t.pos.numel() == 0:
                continue
            new = new_pos(t.pos)
            idx = torch.arange(t.pos.numel(), device=self.device)
            self.write(slot, h, idx, t._replace(k=rotate(t.k, t.pos, new), pos=new.to(torch.int32)))

    def similar(self, slot: int, keep: torch.Tensor, gone: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where `native_evict`: keep (H, C), gone (H, E) storage indices -> each gone key's highest cosine
        similarity with a kept key of its head (float32 (H, E)) and that key's index in keep (int64)."""
        raise NotImplementedError(f"{self.name} has no native eviction")

    def read_heads(self, slot: int) -> "Tokens | None":
        """Every KV head's tokens stacked, k, v (H, n, D), pos and bias (H, n), when the heads hold the
        same number n; None when they differ. A format that can read them in one copy overrides it."""
        lens = self.host[slot]
        if any(n != lens[0] for n in lens):
            return None
        ts = [self.read(slot, h) for h in range(self.n_kv)]
        return Tokens(*(None if x[0] is None else torch.stack(x) for x in zip(*ts)))

    def read_many(self, slot: int, heads: torch.Tensor, idx: torch.Tensor) -> "Tokens":
        """`read` for tokens of several heads: token n is storage index idx[n] of head heads[n]."""
        out = [None] * heads.numel()
        for h in torch.unique(heads).tolist():
            m = (heads == h).nonzero().squeeze(1)
            for j, t in zip(m.tolist(), zip(*self.read(slot, h, idx[m]))):
                out[j] = t
        return Tokens(*(None if x[0] is None else torch.stack(x) for x in zip(*out)))

    def write_many(self, slot: int, heads: torch.Tensor, idx: torch.Tensor, tokens: "Tokens") -> None:
        """`write` for tokens of several heads: token n goes to storage index idx[n] of head heads[n]."""
        for h in torch.unique(heads).tolist():
            m = heads == h
            self.write(slot, h, idx[m], tokens.select(m))

    def positions(self, slot: int, head: int) -> torch.Tensor:
        """`read(slot, head).pos`; a format that can read positions alone overrides it."""
        return self.read(slot, head).pos

    def same_positions(self, slot: int) -> bool:
        """Every KV head of `slot` holds the same positions (in storage order)."""
        pos = [self.positions(slot, h) for h in range(self.n_kv)]
        return all(torch.equal(p, pos[0]) for p in pos)

    def tokens_held(self, slot: int) -> list[int]:
        return list(self.host[slot])

    def check(self, slot: int) -> None:
        """Invariants tests assert after every step: positions strictly increase along each head."""
        for h in range(self.n_kv):
            pos = self.read(slot, h).pos.long()
            if pos.numel() > 1 and not bool((pos[1:] > pos[:-1]).all()):
                raise AssertionError(f"{self.name}: slot {slot} head {h} positions not increasing: {pos.tolist()}")
