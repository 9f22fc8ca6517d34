"""Moving tokens in and out of the paged pools: the step every append and every eviction ends with.

    store_write(pools, blocks, offsets, values): pools[i][blocks[n], offsets[n]] = values[i][n]
    store_gather(pools, blocks, offsets) -> [pool[blocks, offsets] for pool in pools]
Compaction (keep an index set per (slot, head), free emptied blocks) is a gather of the kept tokens
followed by a write to the head's first slots; the store does the block bookkeeping.
"""

from __future__ import annotations

import torch

from kvchat_kernels.dispatch import choose_impl


def store_write_ref(pools, blocks, offsets, values):
    """pools: tensors (n_blocks, block_size, ...); blocks/offsets (N,) long; values: (N, ...) each."""
    for pool, val in zip(pools, values):
        pool[blocks, offsets] = val.to(pool.dtype)


def store_gather_ref(pools, blocks, offsets):
    return [pool[blocks, offsets] for pool in pools]


def store_write(pools, blocks, offsets, values, impl=None):
    if choose_impl(blocks.device, impl) == "triton":
        from kvchat_kernels.store_ops_triton import store_write_triton

        return store_write_triton(pools, blocks, offsets, values)
    return store_write_ref(pools, blocks, offsets, values)


def store_gather(pools, blocks, offsets, impl=None):
    if choose_impl(blocks.device, impl) == "triton":
        from kvchat_kernels.store_ops_triton import store_gather_triton

        return store_gather_triton(pools, blocks, offsets)
    return store_gather_ref(pools, blocks, offsets)
