"""A whole decoder layer of a decode step in one native call (kernels/cpu_layer.c, built into the library
kernels/cpu.py loads): the weights bound once per layer, the store's buffers and the step's per call."""

from __future__ import annotations

import ctypes

import torch

from kvchat_kernels.cpu import _DTYPES, _F, _I, _P, _lib, attention_plan, linear_ok


class _Layer(ctypes.Structure):
    """kernels/cpu_layer.c's `kv_layer`, field for field."""
    _fields_ = ([(n, _P) for n in ("w_in", "b_in", "w_o", "b_o", "w_gu", "b_gu", "w_down", "b_down", "post_w",
                                   "next_w")]
                + [("post_eps", _F), ("next_eps", _F)]
                + [(n, _I) for n in ("hidden", "n_in", "Hq", "Hkv", "D", "inter")]
                + [(n, _P) for n in ("k_pool", "v_pool", "pos_pool", "bias_pool", "rows", "positions", "table",
                                     "lengths")]
                + [(n, _I) for n in ("bs", "max_blocks", "n_tab", "uniform", "splits")]
                + [(n, _P) for n in ("probs", "colsum", "part")] + [("scale", _F), ("cs_rows", _P), ("cs_cap", _I)]
                + [("B", _I)]
                + [(n, _P) for n in ("cos", "sin_s", "work")] + [("dt", ctypes.c_int32)])


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


class Scratch:
    """Buffers reused across calls, grown (by half again) when a call needs more: a decode step's
    intermediates without an allocation per layer. Not shared between threads."""

    def __init__(self):
        self.bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self.bufs[name] = torch.empty(max(n, 1) * 3 // 2 + 64, dtype=dtype)
        return buf


class DecodeLayer:
    """One decoder layer of a decode step in one native call (kernels/cpu_layer.c): the Q/K/V (or Q only)
    matmul, RoPE, the append to a dense paged store, attention, the output projection, both residual
    adds with their RMSNorms and the SiLU-gated MLP. The per-op calls it replaces (`linear`, `rope`,
    `scatter_rows`, `decode_attention`, `add_rms_norm`, `silu_mul`) run in the same order on the same
    values, so its results are theirs bit for bit.

    Weights (row-major, contiguous, the model's dtype) are bound once; `w_in` is the fused Q/K/V rows, or
    the Q rows alone for a layer that reads another layer's store (`owns=False`: nothing appended)."""

    def __init__(self, w_in, b_in, w_o, b_o, w_gu, b_gu, w_down, b_down, post_w, post_eps, next_w, next_eps,
                 Hq: int, Hkv: int, D: int, owns: bool):
        self.keep = (w_in, b_in, w_o, b_o, w_gu, b_gu, w_down, b_down, post_w, next_w)  # alive while bound
        self.dtype, self.owns = w_in.dtype, owns
        self.hidden, self.inter = w_in.shape[1], w_down.shape[1]
        self.Hq, self.Hkv, self.D = Hq, Hkv, D
        L = self.s = _Layer()
        for name, t in zip(("w_in", "b_in", "w_o", "b_o", "w_gu", "b_gu", "w_down", "b_down", "post_w", "next_w"),
                           self.keep):
            setattr(L, name, _ptr(t))
        L.post_eps, L.next_eps = post_eps, next_eps
        L.hidden, L.n_in, L.Hq, L.Hkv, L.D, L.inter = self.hidden, w_in.shape[0], Hq, Hkv, D, self.inter
        L.dt = _DTYPES[self.dtype]
        self.heads = Hq + Hkv if owns else Hq
        self.need = (0, 0, 0)  # scratch elements `run` gives it: probs, part, work (set by `prepare`)

    @staticmethod
    def ok(dtype: torch.dtype, Hq: int, Hkv: int, D: int) -> bool:
        """The shapes and dtypes this call takes (those of `linear` and `decode_attention`)."""
        return linear_ok(dtype) and D <= 512 and Hq % Hkv == 0 and Hq // Hkv <= 8

    def work_size(self, B: int) -> int:
        return B * (self.s.n_in + (self.heads + self.Hq) * self.D + 2 * self.hidden + 3 * self.inter)

    def prepare(self, B: int, cos, sin_s, k_pool, v_pool, pos_pool, bias_pool, rows, positions, table, lengths,
                max_len: int, min_len: int, scale: float, want_colsum: bool, colsum_into=None, colsum_rows=None):
        """Bind this step's store and inputs for `run`. cos, sin_s (B, 1, D); rows: `rows_array` of the (B,
        Hkv) new tokens' flat pool rows (owning layers; their lengths already counted), positions (B,)
        int32; table (B, Hkv, MB) int32, lengths (B, Hkv) int32 or None when every head holds max_len ==
        min_len tokens. The tensors and `rows` must live until `run` returns. -> colsum (B, Hkv, T)
        float32, filled by `run`, when asked for (a fresh tensor), else None. With `colsum_into` (n, Hkv,
        cap) float32 and `colsum_rows` (B,) int64 the sums are added into its rows instead (-> None)."""
        bs = k_pool.shape[1]
        n_blocks, splits = attention_plan(B, self.Hkv, bs, max_len)
        T, G = n_blocks * bs, self.Hq // self.Hkv
        L = self.s
        if colsum_into is not None:
            assert colsum_into.dtype == torch.float32 and colsum_into.is_contiguous()
            assert colsum_rows.dtype == torch.int64  # the kernel reads int64 rows
            colsum, L.cs_rows, L.cs_cap = None, colsum_rows.data_ptr(), colsum_into.shape[2]
            L.colsum = colsum_into.data_ptr()
        else:
            colsum = torch.empty(B, self.Hkv, T, dtype=torch.float32) if want_colsum else None
            L.colsum, L.cs_rows, L.cs_cap = _ptr(colsum), None, 0
        L.k_pool, L.v_pool, L.pos_pool, L.bias_pool = (k_pool.data_ptr(), v_pool.data_ptr(), pos_pool.data_ptr(),
                                                       _ptr(bias_pool))
        L.rows, L.positions = (ctypes.addressof(rows), positions.data_ptr()) if self.owns else (None, None)
        L.table, L.lengths = table.data_ptr(), (None if lengths is None or min_len == max_len else lengths.data_ptr())
        L.bs, L.max_blocks, L.n_tab, L.uniform, L.splits = bs, table.shape[2], n_blocks, max_len, splits
        L.scale, L.B = scale, B
        L.cos, L.sin_s = cos.data_ptr(), sin_s.data_ptr()
        self.need = (B * self.Hq * T, B * self.Hkv * splits * G * (self.D + 2), self.work_size(B))
        return colsum

    def __call__(self, x, h, scratch: Scratch, *args, **kwargs):
        """`prepare(x.shape[0], *args, **kwargs)` and `run` this layer alone -> colsum or None."""
        colsum = self.prepare(x.shape[0], *args, **kwargs)
        run([self], x, h, scratch)
        return colsum


def run(layers: list[DecodeLayer], x: torch.Tensor, h: torch.Tensor, scratch: Scratch) -> None:
    """The prepared `layers`, one after another, in one native call: x, h (B, hidden) contiguous, updated
    in place (h ends as the normed input of the layer after the last). Their intermediates share
    `scratch`'s buffers (sized here, once every layer is prepared: none is freed under a bound layer)."""
    probs = scratch.get("probs", max(lay.need[0] for lay in layers), torch.float32).data_ptr()
    part = scratch.get("part", max(lay.need[1] for lay in layers), torch.float32).data_ptr()
    work = scratch.get("work", max(lay.need[2] for lay in layers), x.dtype).data_ptr()
    for lay in layers:
        lay.s.probs, lay.s.part, lay.s.work = probs, part, work
    ptrs = (ctypes.c_void_p * len(layers))(*[ctypes.addressof(lay.s) for lay in layers])
    _lib().kv_decode_layers(ptrs, len(layers), x.data_ptr(), h.data_ptr())
