"""Kernels for kvchat's paged KV store (installed as `kvchat_kernels`).

Each module holds a private Triton kernel, a pure-torch `*_ref`, and a public dispatcher that picks the
kernel on CUDA and the reference elsewhere (`KVCHAT_KERNELS=ref|triton` or `impl=` overrides). This
package imports nothing from `kvchat`.
"""

from kvchat_kernels.dispatch import choose_impl
from kvchat_kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref
from kvchat_kernels.prefill_attention import prefill_attention, prefill_attention_ref
from kvchat_kernels.quant_attention import quant_decode_attention, quant_decode_attention_ref
from kvchat_kernels.store_ops import store_gather, store_gather_ref, store_write, store_write_ref

__all__ = [
    "choose_impl",
    "paged_decode_attention",
    "paged_decode_attention_ref",
    "prefill_attention",
    "prefill_attention_ref",
    "quant_decode_attention",
    "quant_decode_attention_ref",
    "store_gather",
    "store_gather_ref",
    "store_write",
    "store_write_ref",
]
