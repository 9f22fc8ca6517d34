"""Weight memory for the decode matmuls: one stream on huge pages, rows off the 64-byte grid.

A decode step streams every weight once (kernels/cpu_linear.c). The native layout's weights are copied,
in the order a step reads them, into 2 MiB-aligned chunks that Linux is asked to back with transparent
huge pages (madvise MADV_HUGEPAGE: honoured where THP is "always" or "madvise", the usual default;
elsewhere the call fails and the chunks are ordinary memory). Each weight starts 32 bytes past a
64-byte boundary (`WEIGHT_SKEW`): a 64-byte load then spans two cache lines and the next line is asked
for half a step earlier. Measured with benchmarks/bench_linear.py on this project's 2-core EPYC (Zen 4/5
class, AVX512-BF16, no AMX), the 30 layers and the head in bfloat16, variants interleaved: see the
README's speed section; on 64-byte-aligned weights four rows ran ~30% slower than at +32 bytes
(12.9 vs 9.9 ms). Where the CPU has AMX (tiles read 64-byte rows in place) the weights stay on the grid.
KVCHAT_HUGEPAGES=0 turns the arena off. Only the weights: torch's own huge pages for large allocations
(THP_MEM_ALLOC_ENABLE=1, which would put the KV pools there too) made the paged decode attention slower
here (30 layers x 4 x 3 heads x 4,096 tokens: 15.6-16.1 ms against 13.1-14.0 on 4 KiB pages), so
kvchat leaves torch's allocator as it is.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch

HUGE = 2 << 20  # bytes in a huge page
CHUNK = 64 << 20  # bytes reserved at a time (pages never touched are never backed)
_MADV_HUGEPAGE = 14
WEIGHT_SKEW = 32  # bytes past a 64-byte boundary where each native weight starts (module doc)


def enabled() -> bool:
    return sys.platform.startswith("linux") and os.environ.get("KVCHAT_HUGEPAGES", "1") != "0"


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _advise(addr: int, n: int) -> bool:
    try:
        return _libc().madvise(ctypes.c_void_p(addr), ctypes.c_size_t(n), _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


def trim() -> None:
    """Give the heap's free memory back to Linux (glibc's malloc_trim): the weights' old copies, freed once
    they are in the arena, sit in the heap otherwise (~100 MB of RSS for the embedded model)."""
    try:
        _libc().malloc_trim(ctypes.c_size_t(0))
    except (OSError, AttributeError):  # not glibc
        pass


class Arena:
    """Tensors copied one after another into 2 MiB-aligned, huge-page-advised chunks, each starting `skew`
    bytes past a 64-byte boundary (a multiple of 16, below 64). `place(t)` -> the copy; the chunks live as
    long as any copy does."""

    def __init__(self, chunk: int = CHUNK, skew: int = 0):
        assert skew % 16 == 0 and 0 <= skew < 64
        self.chunk, self.skew, self.buf, self.off = chunk, skew, None, 0
        self.advised = 0  # bytes madvise accepted

    def place(self, t: torch.Tensor) -> torch.Tensor:
        n = t.numel() * t.element_size()
        start = -(-self.off // 64) * 64 + self.skew
        if self.buf is None or start + n > self.buf.numel():
            size = max(self.chunk, -(-(n + self.skew) // HUGE) * HUGE)
            raw = torch.empty(size + HUGE, dtype=torch.uint8, device=t.device)  # not touched yet
            skip = -raw.data_ptr() % HUGE
            self.buf = raw[skip : skip + size]
            self.advised += size if _advise(self.buf.data_ptr(), size) else 0
            start = self.skew
        out = self.buf[start : start + n].view(t.dtype).view(t.shape)
        out.copy_(t)
        self.off = start + n
        return out
