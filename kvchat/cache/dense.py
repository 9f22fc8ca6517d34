"""dense: every token's K and V rows as they are, in paged blocks (the format of `full` and the policies).

Per layer a pool of blocks (block_size tokens x head_dim per KV head) for K and V, one for positions and,
when a method asks for it, one for an additive logit bias (RazorAttention's compensation token). Keys
are stored after RoPE. `store_dtype` defaults to the model's dtype; a 16-bit store under a 32-bit model
(the `half` format) holds half the bytes and attention computes in the model's dtype.
"""

from __future__ import annotations

import torch

from kvchat_kernels import cpu_evict, paged_decode_attention, prefill_attention
from kvchat_kernels.prefill_attention import visible_limits
from kvchat.cache.attention import causal_attention
from kvchat.cache.format import Format, Merge, Tokens
from kvchat.cache.pages import PagedPools


class DenseFormat(Format):
    name = "dense"

    def __init__(self, n_slots, n_kv, head_dim, block_size, dtype, device, with_bias=False, store_dtype=None):
        super().__init__(n_slots, n_kv, head_dim, block_size, dtype, device, with_bias)
        sd = store_dtype or dtype
        specs = {"k": ((head_dim,), sd), "v": ((head_dim,), sd), "pos": ((), torch.int32)}
        if with_bias:
            specs["bias"] = ((), torch.float32)
        self.pages = PagedPools(n_slots, n_kv, block_size, specs, device)
        self.host = self.pages.host
        self.native_layer = self.pages.native and sd == dtype
        self.native_evict = self.native_layer and cpu_evict.ok(self.k, self.pages.table)

    # ---- pools the kernels read --------------------------------------------------------------------
    @property
    def k(self) -> torch.Tensor:
        return self.pages.pools["k"]

    @property
    def v(self) -> torch.Tensor:
        return self.pages.pools["v"]

    @property
    def bias(self) -> torch.Tensor | None:
        return self.pages.pools.get("bias")

    # ---- writes ------------------------------------------------------------------------------------
    def _values(self, k, v, pos, lead: tuple[int, ...]) -> dict[str, torch.Tensor]:
        vals = {"k": k, "v": v, "pos": pos.to(torch.int32).view(*lead[:1], 1).expand(*lead)}
        if self.with_bias:
            vals["bias"] = torch.zeros(lead, device=self.device)
        return vals

    def append_chunk(self, slot, k_pre, k, v, pos) -> None:
        """k, v (T, H_kv, D); pos (T,)."""
        self.pages.append_chunk(slot, self._values(k, v, pos, (k.shape[0], self.n_kv)))

    def append_step(self, slots, slots_t, k_pre, k, v, pos) -> None:
        """k, v (B, H_kv, D); pos (B,)."""
        B = k.shape[0]
        vals = {"k": k, "v": v, "pos": pos.to(torch.int32).view(B, 1).expand(B, self.n_kv)}  # (B, H_kv), a view
        if self.with_bias:
            vals["bias"] = torch.zeros((), device=self.device).expand(B, self.n_kv)
        self.pages.append_step(slots, slots_t, vals)

    def read(self, slot: int, head: int, idx: torch.Tensor | None = None) -> Tokens:
        r = self.pages.read(slot, head, idx)
        return Tokens(r["k"].to(self.dtype), r["v"].to(self.dtype), r["pos"], r.get("bias"))

    def read_heads(self, slot: int) -> Tokens | None:
        r = self.pages.read_heads(slot)
        if r is None:
            return None
        return Tokens(r["k"].to(self.dtype), r["v"].to(self.dtype), r["pos"], r.get("bias"))

    def read_many(self, slot: int, heads: torch.Tensor, idx: torch.Tensor) -> Tokens:
        r = self.pages.read_many(slot, heads, idx)
        return Tokens(r["k"].to(self.dtype), r["v"].to(self.dtype), r["pos"], r.get("bias"))

    def write_many(self, slot: int, heads: torch.Tensor, idx: torch.Tensor, tokens: Tokens) -> None:
        vals = {"k": tokens.k, "v": tokens.v, "pos": tokens.pos}
        if self.with_bias:
            vals["bias"] = tokens.bias if tokens.bias is not None else torch.zeros(idx.numel(), device=self.device)
        self.pages.write_many(slot, heads, idx, vals)

    def same_positions(self, slot: int) -> bool:
        lens = self.host[slot]
        if any(n != lens[0] for n in lens):
            return False
        if self.native_evict:  # one native compare of the heads' position rows
            return cpu_evict.same_rows(self.pages.pools["pos"], self.pages.table[slot], lens[0])
        pos = self.pages.read_heads(slot, names=("pos",))["pos"]  # (H, n): one gather of the slot's blocks
        return bool((pos == pos[:1]).all())

    def positions(self, slot: int, head: int) -> torch.Tensor:
        return self.pages.read(slot, head, names=("pos",))["pos"]

    def write(self, slot: int, head: int, idx: torch.Tensor, tokens: Tokens) -> None:
        vals = {"k": tokens.k, "v": tokens.v, "pos": tokens.pos}
        if self.with_bias:
            vals["bias"] = tokens.bias if tokens.bias is not None else torch.zeros(idx.numel(), device=self.device)
        self.pages.write(slot, head, idx, vals)

    def compact(self, slot: int, keep: list[torch.Tensor], merge: Merge | None = None) -> None:
        if merge is None:
            self.pages.compact(slot, keep)
        else:  # every (merged) head keeps the same number: one native call merges and moves (kernels/cpu_evict.c)
            heads = merge.heads
            rows = keep if heads is None else [keep[h] for h in heads]
            self.pages.compact_native(slot, torch.stack(rows), merge.gone, merge.into, merge.w, merge.self_w, heads)

    def similar(self, slot: int, keep: torch.Tensor, gone: torch.Tensor):
        return cpu_evict.paged_max_cosine(self.k, self.pages.table[slot], keep, gone)

    def check(self, slot: int) -> None:
        super().check(slot)
        self.pages.check(slot)

    def free_slot(self, slot: int) -> None:
        self.pages.free_slot(slot)

    def trim(self) -> None:
        self.pages.trim()

    # ---- attention ---------------------------------------------------------------------------------
    def stored_positions(self, slot: int) -> torch.Tensor:
        """(H_kv, L) positions in storage order (L the longest head in whole blocks)."""
        lens = self.pages.lengths[slot]
        n_blocks = max(1, -(-max(self.host[slot]) // self.block_size))
        pos = self.pages.pools["pos"].index_select(0, self.pages.table[slot, :, :n_blocks].reshape(-1).long())
        return pos.view(self.n_kv, -1), lens

    def attend_prefill(self, q, slot, q_pos, scale, last_w, fresh=None):
        """q (T, H_q, D) -> out (T, H_q, D), rows (H_q, last_w, L) | None.

        `fresh` = the chunk's own (k, v) when this layer just appended it: then the chunk is the last T
        tokens of every head and causality by index is causality by position. Otherwise (a layer reading
        another layer's store) the visible keys are found from the stored positions."""
        T = q.shape[0]
        if fresh is not None and all(n == T for n in self.host[slot]):
            # Nothing stored before this chunk: attend to its own K/V (no gather; a first chunk carries
            # no logit bias yet, appends write 0).
            return causal_attention(q, *fresh, scale, last_w)
        limits = None if fresh is not None else visible_limits(*self.stored_positions(slot), q_pos)
        res = prefill_attention(q, self.k, self.v, self.pages.table[slot], self.pages.lengths[slot], scale,
                                bias_pool=self.bias, last_w=last_w, limits=limits)
        return res if last_w > 0 else (res, None)

    def attend_decode(self, q, slots, slots_t, scale, colsum=False):
        """q (B, H_q, D) -> out (B, H_q, D), colsum (B, H_kv, T) | None. slots: the step's slots (a list),
        slots_t the same as a tensor."""
        table, lengths, mx, mn = self.pages.step_tables(slots, slots_t)
        res = paged_decode_attention(q, self.k, self.v, table, lengths, scale, bias_pool=self.bias,
                                     return_colsum=colsum, impl=self.pages.impl, max_len=mx, min_len=mn)
        return res if colsum else (res, None)

    # ---- bytes -------------------------------------------------------------------------------------
    def bytes_held(self) -> int:
        return self.pages.bytes_held()

    def bytes_held_slot(self, slot: int) -> int:
        return self.pages.bytes_held_slot(slot)

    def bytes_reserved(self) -> int:
        return self.pages.bytes_reserved()

    def storage_bytes(self) -> int:
        """The storage behind the blocks the tables reference, measured on the tensors (tests)."""
        return len(self.pages.used_block_ids()) * self.pages.block_bytes + self.pages.meta_bytes()
