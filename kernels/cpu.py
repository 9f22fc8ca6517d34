"""kvchat's native CPU decode ops (kernels/cpu_ops.c, cpu_linear.c, cpu_attention.c, cpu_layer.c) and the
bfloat16 causal attention of a prompt's first chunk (cpu_prefill.c) and D2O's eviction similarities
(cpu_similar.c) and in-place evictions on the paged store (cpu_evict.c, wrapped in kernels/cpu_evict.py),
built once per machine into one library, called through ctypes.

A decode step on the CPU spent as long in small ops as in its matmuls (each ATen op a few microseconds
of dispatch for a few hundred bytes of work), and oneDNN's GEMV streamed the weights at ~15 GB/s of the
~28 this machine reads. cpu_ops.c holds a streaming matmul for a step's few rows, a layer's elementwise
work (residual add + RMSNorm, RoPE, SiLU-and-multiply) and the append's row copies; cpu_attention.c the
paged decode attention. Plain C (no torch headers: it compiles in about a second with the system's
`cc`), built with `-O3 -march=native -fopenmp` into KVCHAT_HOME/native (key: the sources, the compiler
and this CPU's flags; written to a temporary name and renamed, so concurrent builds are safe) and
linked against the libgomp torch has already loaded, so it runs on torch's threads.

Without a C compiler, or with KVCHAT_NATIVE=0, `enabled()` is False and every caller keeps its torch
path (the same results to float32 rounding; this is only speed). `status()` says which and why. Each
function has a torch reference it is tested against (tests/test_kernels_cpu.py): F.linear,
`add_rms_norm_ref`, kvchat's `rope_rolled`, `silu_mul_ref`, and `paged_decode_attention_ref`.
cpu_layer.c chains them into a whole decode layer a call (kernels/cpu_layer.py; tested against the
chain of per-op calls in tests/test_decode_layer.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

_DIR = Path(__file__).parent
_SOURCES = [_DIR / "cpu_ops.c", _DIR / "cpu_linear.c", _DIR / "cpu_attention.c", _DIR / "cpu_layer.c",
            _DIR / "cpu_prefill.c", _DIR / "cpu_similar.c", _DIR / "cpu_evict.c"]  # one library; all include cpu_common.h
_HEADERS = [_DIR / "cpu_common.h"]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "kv_omp_threads": ([], ctypes.c_int),
    "kv_add_rms_norm": ([_P, _P, _P, _P, _I, _I, _F, ctypes.c_int], None),
    "kv_rope": ([_P, _I, _P, _P, _P, _I, _I, _I, ctypes.c_int], None),
    "kv_silu_mul": ([_P, _P, _I, _I, ctypes.c_int], None),
    "kv_fast_linear": ([ctypes.c_int], ctypes.c_int),
    "kv_linear": ([_P, _P, _P, _P, _I, _I, _I, ctypes.c_int], None),
    "kv_set_amx": ([ctypes.c_int], ctypes.c_int),
    "kv_scatter_rows": ([_P, _P, _I, _I, _I, _I, _P, _I], None),
    "kv_decode_attention": ([_P, _I] + [_P] * 8 + [_P, _I, _P] + [_I] * 9 + [ctypes.c_int, _F, ctypes.c_int], None),
    "kv_decode_layers": ([_P, _I, _P, _P], None),
    "kv_fast_prefill": ([], ctypes.c_int),
    "kv_prefill_attention": ([_P, _I, _P, _I, _P, _I, _P, _I, _P, _I, _I, _I, _F], None),
    "kv_max_cosine_scratch": ([_I, _I, _I], _I),
    "kv_max_cosine": ([_P, _P, _I, _I, _I, _I, _P, _P, _P, ctypes.c_int], None),
    "kv_paged_max_cosine_scratch": ([_I, _I, _I, _I, ctypes.c_int], _I),
    "kv_paged_max_cosine": ([_P, _P] + [_I] * 6 + [_P] * 5 + [ctypes.c_int], None),
    "kv_merge_compact": ([_P, _P, _I, _P] + [_I] * 6 + [_P] * 4 + [_F, _P, _P, ctypes.c_int], None),
    "kv_same_rows": ([_P, _P] + [_I] * 5, ctypes.c_int32),
}
_why_not = ""
_warned = False


def _build_dir() -> Path:
    home = os.environ.get("KVCHAT_HOME") or Path.home() / ".cache" / "kvchat"
    return Path(home).expanduser() / "native"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def build_flags() -> list[str]:
    """The compiler flags of the library (benchmarks/bench_native_ab.py builds other sources with them)."""
    # KVCHAT_NATIVE_MARCH: another target than this CPU (tests build the AVX2 paths on an AVX-512 machine)
    march = os.environ.get("KVCHAT_NATIVE_MARCH", "native")
    return ["-O3", f"-march={march}", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC", "-std=c11"]


def bind(lib: ctypes.CDLL, fallback: ctypes.CDLL | None = None) -> ctypes.CDLL:
    """A loaded library's functions typed as this module calls them; with `fallback` (a bound library), a
    function `lib` lacks (an older build's) is taken from it."""
    for name, (args, res) in _SIGNATURES.items():
        if fallback is not None and not hasattr(lib, name):
            setattr(lib, name, getattr(fallback, name))
            continue
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    lib.kv_set_amx(int(os.environ.get("KVCHAT_AMX", "1") != "0"))
    return lib


def _build(cc: str) -> Path:
    """The shared library for this source, compiler and CPU, built if it is not there yet."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    flags = build_flags()
    texts = [f.read_text() for f in _SOURCES + _HEADERS]
    key = hashlib.sha256("\0".join([*texts, version, " ".join(flags), _cpu_flags()]).encode()).hexdigest()
    out = _build_dir() / f"cpu_ops-{key[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *flags, *map(str, _SOURCES), "-o", tmp, "-lm"], capture_output=True, text=True,
                             timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed: {res.stderr.strip()[-400:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def _lib():
    """The loaded library, or None (the reason in `_why_not`)."""
    global _why_not
    cc = _compiler()
    if cc is None:
        _why_not = "no C compiler (install gcc, or set CC)"
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except Exception as e:  # a compiler that cannot build it: the torch path, with the reason kept
        _why_not = f"build failed: {e}"
        return None
    return bind(lib)


def available() -> bool:
    """The library is built and loaded (whether or not KVCHAT_NATIVE=0 turns it off)."""
    return _lib() is not None


def enabled() -> bool:
    """kvchat's CPU paths use the native ops: built, and not turned off by KVCHAT_NATIVE=0 (read at each
    decision, so tests can compare the two paths; callers decide once per model, runner or store).
    When they are wanted but cannot be built, one line on stderr says why (once a process)."""
    global _warned
    if os.environ.get("KVCHAT_NATIVE", "1") == "0":
        return False
    if available():
        return True
    if not _warned:
        _warned = True
        print(f"kvchat: native CPU decode ops unavailable ({_why_not}); decoding on the slower torch path "
              "(KVCHAT_NATIVE=0 silences this)", file=sys.stderr)
    return False


def status() -> str:
    """One line for `kvchat info` and the benchmarks: which path the CPU decode ops take, and why."""
    if not available():
        return f"torch ({_why_not})"
    if not enabled():
        return "torch (KVCHAT_NATIVE=0)"
    return f"native (kernels/cpu_ops.c, cpu_linear.c, cpu_attention.c, cpu_layer.c, cpu_prefill.c, cpu_similar.c, cpu_evict.c){'; bfloat16 matmuls on AMX tiles' if amx() else ''}"


def supports(*tensors: torch.Tensor) -> bool:
    """The native ops take CPU tensors of one dtype, float32 or bfloat16."""
    return available() and all(t.device.type == "cpu" and t.dtype == tensors[0].dtype for t in tensors) \
        and tensors[0].dtype in _DTYPES


def threads() -> int:
    """OpenMP's thread count as the library sees it (equal to torch.get_num_threads(): one libgomp)."""
    return _lib().kv_omp_threads()


# ---- decode matmuls -----------------------------------------------------------------------------------

LINEAR_ROWS = 16  # `linear` takes up to this many rows (a decode step's batch); more go to torch


def linear_ok(dtype: torch.dtype) -> bool:
    """This CPU runs `linear` in `dtype` with vector instructions (AVX-512; AVX512-BF16 for bfloat16)."""
    return available() and dtype in _DTYPES and bool(_lib().kv_fast_linear(_DTYPES[dtype]))


def amx() -> bool:
    """bfloat16 `linear` runs on AMX tiles (cpu_linear.c): compiled for this CPU, the tile state granted by
    Linux, and not turned off by KVCHAT_AMX=0 or `set_amx(False)`."""
    return available() and bool(_lib().kv_set_amx(-1))


def set_amx(on: bool) -> bool:
    """Turn the AMX path on or off (tests run both paths); -> whether it is on now."""
    return available() and bool(_lib().kv_set_amx(int(on)))


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for x (M <= LINEAR_ROWS, K) contiguous, w (N, K) contiguous: -> (M, N)."""
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, dtype=x.dtype)
    _lib().kv_linear(x.data_ptr(), w.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(), M, N, K,
                     _DTYPES[x.dtype])
    return y


# ---- RMSNorm with the residual add ------------------------------------------------------------------

def add_rms_norm_ref(x, delta, w, eps):
    """-> (x + delta, HF RMSNorm of it). delta may be None."""
    if delta is not None:
        x = x + delta
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return x, w * h.to(x.dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, w: torch.Tensor, eps: float):
    """x (N, dim) contiguous, updated in place by `+= delta` -> (x, normed (N, dim))."""
    out = torch.empty_like(x)
    _lib().kv_add_rms_norm(x.data_ptr(), None if delta is None else delta.data_ptr(), w.data_ptr(), out.data_ptr(),
                           x.shape[0], x.shape[1], eps, _DTYPES[x.dtype])
    return x, out


# ---- RoPE --------------------------------------------------------------------------------------------

def rope(x: torch.Tensor, heads: int, D: int, cos: torch.Tensor, sin_s: torch.Tensor) -> torch.Tensor:
    """The first `heads` heads of each row of x (N, >= heads * D; rows may be strided, each row's heads
    contiguous) rotated as kvchat's `rope_rolled` does -> (N, heads, D). cos, sin_s (N, 1, D) contiguous."""
    N = x.shape[0]
    out = torch.empty(N, heads, D, dtype=x.dtype)
    _lib().kv_rope(x.data_ptr(), x.stride(0), cos.data_ptr(), sin_s.data_ptr(), out.data_ptr(), N, heads, D,
                   _DTYPES[x.dtype])
    return out


# ---- SiLU and multiply -------------------------------------------------------------------------------

def silu_mul_ref(gu: torch.Tensor) -> torch.Tensor:
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """gu (N, 2 I) contiguous, gate then up -> silu(gate) * up (N, I)."""
    N, I2 = gu.shape
    out = torch.empty(N, I2 // 2, dtype=gu.dtype)
    _lib().kv_silu_mul(gu.data_ptr(), out.data_ptr(), N, I2 // 2, _DTYPES[gu.dtype])
    return out


# ---- the decode step's append -----------------------------------------------------------------------

def scatter_ok(pool: torch.Tensor, val: torch.Tensor) -> bool:
    """`scatter_rows` takes a value (B, H[, D]) of a contiguous CPU pool's dtype (n_blocks, bs[, D]) whose
    rows are contiguous (B and H may be strided, or broadcast with stride 0). Called for every pool of
    every layer of a decode step: only the checks a caller can get wrong."""
    return val.dtype == pool.dtype and val.dim() == pool.dim() <= 3 and (val.dim() == 2 or val.stride(2) == 1)


def scatter_rows(pool: torch.Tensor, val: torch.Tensor, rows) -> None:
    """pool (n_blocks, bs, *row); row (b, h) of val goes to flat pool row rows[b * H + h] (rows: a ctypes
    int64 array, from `rows_array`)."""
    es = val.element_size()
    _lib().kv_scatter_rows(pool.data_ptr(), val.data_ptr(), val.stride(0) * es, val.stride(1) * es, val.shape[0],
                           val.shape[1], rows, es * (pool.shape[2] if pool.dim() == 3 else 1))


def rows_array(rows: list[int]):
    return (ctypes.c_int64 * len(rows))(*rows)


# ---- decode attention --------------------------------------------------------------------------------

def decode_attention_ok(q, k_pool, v_pool, block_table, lengths, max_len=None, min_len=None) -> bool:
    """The layouts `decode_attention` takes: CPU tensors, K/V in q's dtype and contiguous, q's heads
    contiguous within a row (rows may be strided: q may be a view of a fused Q/K tensor), and lengths
    unless every head holds max_len == min_len tokens."""
    return (supports(q, k_pool, v_pool) and q.shape[-1] <= 512 and q.shape[1] <= 8 * block_table.shape[1]
            and block_table.dtype == torch.int32 and q.stride(2) == 1 and q.stride(1) == q.shape[2]
            and (lengths.dtype == torch.int32 and lengths.is_contiguous() if lengths is not None
                 else max_len is not None and max_len == min_len)
            and all(t.is_contiguous() for t in (k_pool, v_pool, block_table)))


def attention_plan(B: int, Hkv: int, bs: int, max_len: int) -> tuple[int, int]:
    """-> (blocks the longest head spans, splits of each head's tokens): enough work items for every
    thread four times over, none shorter than 64 tokens."""
    splits = max(1, min(64, -(-4 * torch.get_num_threads() // (B * Hkv)), max_len // 64))
    return max(1, -(-max_len // bs)), splits


def decode_attention(q, k_pool, v_pool, block_table, lengths, scale, bias_pool=None, return_colsum=False,
                     max_len: int | None = None, min_len: int | None = None, colsum_into=None, colsum_rows=None):
    """`paged_decode_attention_ref`'s contract (kernels/paged_attention.py) in one call. max_len / min_len:
    the longest and shortest head when the caller knows them; lengths may be None when they are equal.
    `colsum_into` (n, Hkv, cap) float32 contiguous with `colsum_rows` (B,) int64: the column sums are added
    into its rows colsum_rows[b] (tokens below cap) instead of returned; -> out then."""
    B, Hq, D = q.shape
    Hkv, MB = block_table.shape[1], block_table.shape[2]
    bs = k_pool.shape[1]
    if max_len is None:
        max_len = int(lengths.max()) if lengths.numel() else 0
    if lengths is not None and min_len == max_len:
        lengths = None  # every head holds max_len tokens: nothing per head to read
    if bias_pool is not None and (bias_pool.dtype != torch.float32 or not bias_pool.is_contiguous()):
        bias_pool = bias_pool.float().contiguous()
    n_blocks, splits = attention_plan(B, Hkv, bs, max_len)
    T = n_blocks * bs
    out = torch.empty(B, Hq, D, dtype=q.dtype)
    probs = torch.empty(B, Hq, T, dtype=torch.float32)
    if colsum_into is not None:
        assert colsum_into.dtype == torch.float32 and colsum_into.is_contiguous() and colsum_rows.dtype == torch.int64
        colsum, return_colsum = colsum_into, False
    else:
        colsum = torch.empty(B, Hkv, T, dtype=torch.float32) if return_colsum else None  # summed by the kernel
    part = torch.empty(B * Hkv * splits * (Hq // Hkv) * (D + 2), dtype=torch.float32)
    _lib().kv_decode_attention(q.data_ptr(), q.stride(0), k_pool.data_ptr(), v_pool.data_ptr(), block_table.data_ptr(),
                               None if lengths is None else lengths.data_ptr(), None if bias_pool is None else bias_pool.data_ptr(),
                               out.data_ptr(), probs.data_ptr(), None if colsum is None else colsum.data_ptr(),
                               None if colsum_into is None else colsum_rows.data_ptr(),
                               0 if colsum_into is None else colsum_into.shape[2], part.data_ptr(), B, Hq, Hkv, D, bs,
                               MB, n_blocks, max_len, splits, int(colsum is not None),
                               scale, _DTYPES[q.dtype])
    return (out, colsum) if return_colsum else out



# ---- prefill attention -------------------------------------------------------------------------------

def causal_attention_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """`causal_attention` takes these: bfloat16 on a CPU with AVX512-BF16 (cpu_prefill.c; elsewhere torch's
    flash attention is as fast), the native ops on, head size 64, each position's heads contiguous, k and v
    each with its own row stride."""
    return (enabled() and supports(q, k, v) and q.dtype == torch.bfloat16 and bool(_lib().kv_fast_prefill())
            and q.shape[-1] == 64 and k.shape[-1] == 64 and q.shape[1] % k.shape[1] == 0 and q.shape[0] > 0
            and k.shape == v.shape and all(t.stride(2) == 1 and t.stride(1) == 64 for t in (q, k, v)))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q (T, H_q, 64), k/v (T, H_kv, 64) bfloat16 (`causal_attention_ok`) -> (T, H_q, 64): query i of head h
    attends to keys 0..i of KV head h // (H_q / H_kv), as torch's SDPA with is_causal and enable_gqa does
    (float32 scores and softmax, probabilities rounded to bfloat16 for the product with V, as its CPU flash
    attention rounds them)."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    Tp = -(-T // 32) * 32
    out = torch.empty(T, Hq, D, dtype=q.dtype)
    scratch = torch.empty(2 * Hkv * Tp * D, dtype=torch.int16)
    _lib().kv_prefill_attention(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), out.data_ptr(),
                                Hq * D, scratch.data_ptr(), T, Hq, Hkv, scale)
    return out


# ---- D2O's similarities ------------------------------------------------------------------------------

def max_cosine_ref(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a (..., E, D), b (..., C, D) -> each row of a's highest cosine similarity with a row of b (float32
    (..., E)) and that row (int64): normalize, matmul, max in float32."""
    return (F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).transpose(-1, -2)).max(-1)


def max_cosine_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """`max_cosine` takes these: the native ops on, CPU tensors of one dtype (float32 or bfloat16), both
    (g, rows, D) contiguous with the same g and D <= 512, b not empty."""
    return (enabled() and supports(a, b) and a.dim() == b.dim() == 3 and a.shape[0] == b.shape[0]
            and a.shape[2] == b.shape[2] <= 512 and b.shape[1] > 0 and a.is_contiguous() and b.is_contiguous())


def max_cosine(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a (g, E, D), b (g, C, D) -> (each row of a's highest cosine similarity with a row of b of its head,
    float32 (g, E); that row, int64 (g, E)): (F.normalize(a) @ F.normalize(b).mT).max(-1) in float32,
    without the (E, C) matrix (cpu_similar.c): `max_cosine_ref` to float32 rounding."""
    g, E, D = a.shape
    C = b.shape[1]
    best = torch.empty(g, E, dtype=torch.float32)
    idx = torch.empty(g, E, dtype=torch.int64)
    if E:
        lib = _lib()
        scratch = torch.empty(lib.kv_max_cosine_scratch(g, C, D), dtype=torch.uint8)
        lib.kv_max_cosine(a.data_ptr(), b.data_ptr(), g, E, C, D, best.data_ptr(), idx.data_ptr(), scratch.data_ptr(),
                          _DTYPES[a.dtype])
    return best, idx
