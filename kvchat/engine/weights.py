"""The weights as kvchat's forward runs them: fused projections, laid out for the GEMMs a CPU does fastest.

Q/K/V and gate/up are fused into one matmul each (fewer, larger ops). On the CPU the layout follows
the dtype:
- bfloat16 on a CPU that computes it (AVX512-BF16/AMX): every projection is packed once into oneDNN's
  blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, what inductor's freezing pass does) and
  run by `_linear_pointwise`. Measured on this project's 2-core EPYC, one decode step's GEMMs at
  batch 1 take 7.6 ms packed vs 13.9 ms through `F.linear` (bit-identical results: the same kernel
  without the per-call reorder of the weight).
- float32: row-major, or (in, out) storage for one or two rows, where fp32 GEMV runs ~35% faster on
  the CPU this was tuned on (30 layers: 22 vs 34 ms).
Packing rewrites the HF modules' weights in place (holding them twice would double the model's
memory), so HF's own forward no longer runs on that model object: a pre-hook says so instead of
computing garbage. The layout is built once per loaded model and shared by every runner over it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class Norm:
    """An RMSNorm module as one `F.rms_norm` call (one op instead of ~7 for HF's module); any other
    norm module is called as it is."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        self.weight = getattr(module, "weight", None)
        self.fused = type(module).__name__.endswith("RMSNorm") and isinstance(eps, float) and self.weight is not None
        self.eps = eps
        self.shape = tuple(self.weight.shape) if self.weight is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        return self.module(x)


class Linear:
    """x (N, in) -> (N, out). `packed`: w is in oneDNN's blocked layout (only `__call__` may read it)."""

    __slots__ = ("w", "b", "packed")

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, packed: bool = False):
        self.w, self.b, self.packed = w, b, packed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.w, self.b, "none", [], "")
        return F.linear(x, self.w, self.b)


@dataclass
class LayerWeights:
    in_norm: Norm
    post_norm: Norm
    qkv: Linear
    q: Linear  # the Q rows only, for a layer reading another layer's store (built on first use)
    q_norm: torch.nn.Module | None
    k_norm: torch.nn.Module | None
    o: Linear
    gate_up: Linear
    down: Linear
    act: object


class Weights:
    """Every layer's LayerWeights and the LM head, in one layout. `Weights.of(lm, max_slots)`."""

    def __init__(self, layers: list[LayerWeights], lm_head: Linear, layout: str):
        self.layers, self.lm_head, self.layout = layers, lm_head, layout

    @staticmethod
    def of(lm, max_slots: int = 1) -> "Weights":
        layout = choose_layout(lm.desc.dtype, lm.desc.device, max_slots)
        cached = getattr(lm, "_kvchat_weights", None)
        if cached is not None and (cached.layout == layout or cached.layout == "packed"):
            return cached  # packed weights cannot go back; they are the fastest at every batch size
        w = build(lm.hf, layout)
        lm._kvchat_weights = w
        return w


def choose_layout(dtype: torch.dtype, device: torch.device, max_slots: int) -> str:
    """"packed" | "transposed" | "rows". KVCHAT_PACK=0 turns packing off (tests compare the two)."""
    if device.type != "cpu":
        return "rows"
    if dtype == torch.bfloat16 and os.environ.get("KVCHAT_PACK", "1") != "0" and packing_works():
        return "packed"
    return "transposed" if dtype == torch.float32 and max_slots <= 2 else "rows"


_PACK_OK: bool | None = None


def packing_works() -> bool:
    """oneDNN is built in, computes bfloat16 on this CPU, and a packed matmul equals F.linear."""
    global _PACK_OK
    if _PACK_OK is None:
        try:
            ok = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            if ok:
                g = torch.Generator().manual_seed(0)
                w = torch.randn(48, 40, generator=g).bfloat16()
                x = torch.randn(3, 40, generator=g).bfloat16()
                got = Linear(torch.ops.mkldnn._reorder_linear_weight(w, 1), None, True)(x)
                ok = torch.allclose(got.float(), F.linear(x, w).float(), rtol=1e-2, atol=1e-2)
        except Exception:  # an op missing from this build: the plain path
            ok = False
        _PACK_OK = bool(ok)
    return _PACK_OK


def _storage(w: torch.Tensor, layout: str) -> torch.Tensor:
    """`w` (out, in) as the layout wants it: a view over (in, out) storage, packed, or row-major."""
    if layout == "transposed":
        return w if w.stride(0) == 1 else w.t().contiguous().t()
    if layout == "packed":
        return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 1)
    return w.contiguous()


def _fused(linears: list[torch.nn.Linear], layout: str) -> Linear:
    """One Linear over the concatenated weights of `linears` (and biases, if they all have one)."""
    w = torch.cat([m.weight.data for m in linears], dim=0)
    biases = [m.bias for m in linears]
    b = None if any(x is None for x in biases) else torch.cat([x.data for x in biases])
    if layout == "packed":
        # The HF modules can't hold blocked weights; drop their separate copies instead of keeping both.
        for m in linears:
            m.weight.data = torch.empty(0, dtype=w.dtype)
        return Linear(_storage(w, layout), b, True)
    fused = _storage(w, layout)
    off = 0
    for m in linears:  # the HF modules keep views of the fused tensor: nothing is held twice
        n = m.weight.shape[0]
        m.weight.data = fused[off : off + n]
        if b is not None:
            m.bias.data = b[off : off + n]
        off += n
    return Linear(fused, b)


def _single(linear: torch.nn.Linear, layout: str, copy: bool = False) -> Linear:
    w = _storage(linear.weight.data, layout)
    if not copy:
        linear.weight.data = w if layout != "packed" else torch.empty(0, dtype=w.dtype)
    return Linear(w, linear.bias, layout == "packed")


class _QRows:
    """A layer's Q-only projection, built on first use (most profiles never read another layer's store).
    Packed Q/K/V can't be sliced: its plain rows come back exactly by running it on the identity
    (products with 1 and sums of 0), once."""

    def __init__(self, qkv: Linear, n_q: int):
        self.qkv, self.n_q, self.built = qkv, n_q, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.built is None:
            w, n = self.qkv.w, self.n_q
            b = None if self.qkv.b is None else self.qkv.b[:n]
            if self.qkv.packed:
                eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
                rows = Linear(w, None, True)(eye).t()[:n].contiguous()  # (n_q, in)
                self.built = Linear(_storage(rows, "packed"), b, True)
            else:
                self.built = Linear(w[:n], b)
        return self.built(x)


def build(hf, layout: str) -> Weights:
    layers = []
    tied = hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    for layer in hf.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        n_q = a.q_proj.weight.shape[0]
        qkv = _fused([a.q_proj, a.k_proj, a.v_proj], layout)
        layers.append(LayerWeights(
            in_norm=Norm(layer.input_layernorm), post_norm=Norm(layer.post_attention_layernorm), qkv=qkv,
            q=_QRows(qkv, n_q), q_norm=getattr(a, "q_norm", None), k_norm=getattr(a, "k_norm", None),
            o=_single(a.o_proj, layout), gate_up=_fused([mlp.gate_proj, mlp.up_proj], layout),
            down=_single(mlp.down_proj, layout), act=mlp.act_fn,
        ))
    # A head tied to the embedding keeps its rows for lookups: packed, it is a copy.
    head = _single(hf.lm_head, layout, copy=tied and layout == "packed")
    if layout == "packed":
        hf.register_forward_pre_hook(_packed_guard)
    return Weights(layers, head, layout)


def _packed_guard(module, args):
    raise RuntimeError("this model's weights are packed for kvchat's runner (bfloat16 on this CPU); HF's own "
                       "forward cannot run on it: load another copy, or set KVCHAT_PACK=0 before loading")
