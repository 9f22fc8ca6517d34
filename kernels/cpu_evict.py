"""An eviction with merges on a paged CPU store, in place (kernels/cpu_evict.c): D2O's per-layer eviction
in two native calls instead of ~50 torch ops and three copies of the layer's tokens.

    paged_max_cosine(k_pool, table, keep, gone) -> (best, idx)
        each evicted key's highest cosine similarity with a kept key of its head, and that key's index in
        keep: `cpu.max_cosine` of the rows the indices name, read through the block table
    merge_compact(pools, table, keep, gone, into, w, self_w)
        every evicted token j of head h with w[h, j] > 0 merges into kept token into[h, j]:
        kept <- (self_w x kept + sum w_j x ev_j) / (self_w + sum w_j), keys and values (pools[0], pools[1]);
        then each head's kept tokens move to its first storage indices in every pool
    same_rows(pool, table, n)
        whether every head's first n rows hold head 0's bytes (the heads hold the same positions)

The references are the torch path of kvchat/methods/d2o.py (`max_similarity` on gathered rows,
`merge_rows`, the store's compaction): tests/test_d2o_native.py runs both on the same store and asks for
the same bytes.
"""

from __future__ import annotations

import ctypes

import torch

from kvchat_kernels import cpu


def ok(k_pool: torch.Tensor, table: torch.Tensor) -> bool:
    """The native eviction takes this store: the native ops on, a contiguous CPU key pool (n_blocks, bs, D)
    of float32 or bfloat16 with D <= 512, an int32 block table."""
    return (cpu.enabled() and cpu.supports(k_pool) and k_pool.dim() == 3 and k_pool.shape[2] <= 512
            and k_pool.is_contiguous() and table.dtype == torch.int32)


def _idx(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64).contiguous()


def paged_max_cosine(k_pool: torch.Tensor, table: torch.Tensor, keep: torch.Tensor, gone: torch.Tensor):
    """k_pool (n_blocks, bs, D); table (H, MB) a slot's block table; keep (H, C), gone (H, E) storage indices
    -> best (H, E) float32, idx (H, E) int64 into keep."""
    H, C = keep.shape
    E, D = gone.shape[1], k_pool.shape[2]
    best = torch.empty(H, E, dtype=torch.float32)
    idx = torch.empty(H, E, dtype=torch.int64)
    if E == 0:
        return best, idx
    lib, dt = cpu._lib(), cpu._DTYPES[k_pool.dtype]
    keep, gone, table = _idx(keep), _idx(gone), table.contiguous()
    scratch = torch.empty(lib.kv_paged_max_cosine_scratch(H, C, E, D, dt), dtype=torch.uint8)
    lib.kv_paged_max_cosine(k_pool.data_ptr(), table.data_ptr(), table.shape[1], k_pool.shape[1], H, C, E, D,
                            keep.data_ptr(), gone.data_ptr(), best.data_ptr(), idx.data_ptr(), scratch.data_ptr(), dt)
    return best, idx


def merge_compact(pools: list[torch.Tensor], table: torch.Tensor, keep: torch.Tensor, gone: torch.Tensor,
                  into: torch.Tensor | None = None, w: torch.Tensor | None = None,
                  self_w: float | torch.Tensor = 1.0) -> None:
    """pools: contiguous (n_blocks, bs, ...) tensors, the keys and values first (`ok`); table (H, MB);
    keep (H, C) sorted, gone (H, E) the evicted tokens (entries with w 0 are not read: a head evicting fewer
    can pad); into (H, E) indices into keep, w (H, E) float32 (0: dropped unmerged); w None: a compaction
    without merges. self_w: a kept token's own weight, one for all heads or (H,) one per head."""
    H, C = keep.shape
    E, D = gone.shape[1], pools[0].shape[2]
    assert all(p.is_contiguous() and p.shape[:2] == pools[0].shape[:2] for p in pools)
    assert pools[1].dtype == pools[0].dtype and pools[1].shape == pools[0].shape
    keep, gone, table = _idx(keep), _idx(gone), table.contiguous()
    into = None if w is None else _idx(into)
    w = None if w is None else w.to(torch.float32).contiguous()
    per_head = isinstance(self_w, torch.Tensor)
    self_ws = self_w.to(torch.float32).contiguous() if per_head else None
    ptrs = (ctypes.c_void_p * len(pools))(*[p.data_ptr() for p in pools])
    row_bytes = (ctypes.c_int64 * len(pools))(*[p[0, 0].numel() * p.element_size() for p in pools])
    scratch = torch.empty(C * (2 * D + 2), dtype=torch.float32)
    cpu._lib().kv_merge_compact(ptrs, row_bytes, len(pools), table.data_ptr(), table.shape[1], pools[0].shape[1], H,
                                C, E, D, keep.data_ptr(), gone.data_ptr(), None if w is None else into.data_ptr(),
                                None if w is None else w.data_ptr(), 0.0 if per_head else self_w,
                                None if self_ws is None else self_ws.data_ptr(), scratch.data_ptr(),
                                cpu._DTYPES[pools[0].dtype])


def same_rows(pool: torch.Tensor, table: torch.Tensor, n: int) -> bool:
    """pool (n_blocks, bs, ...) contiguous CPU; table (H, MB) int32, a slot's block table -> whether the first n
    rows of every head are head 0's, byte for byte (for integer pools: equal values). One native call
    instead of a gather of every head's rows and a comparison (~0.2 ms of each D2O eviction)."""
    assert pool.is_contiguous() and table.dtype == torch.int32 and n <= table.shape[1] * pool.shape[1]
    table = table.contiguous()
    rb = pool[0, 0].numel() * pool.element_size()
    return bool(cpu._lib().kv_same_rows(pool.data_ptr(), table.data_ptr(), table.shape[1], pool.shape[1], rb,
                                        table.shape[0], n))
