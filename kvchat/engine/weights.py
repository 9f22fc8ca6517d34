"""The weights as kvchat's forward runs them: fused projections, laid out for the GEMMs a CPU does fastest.

Q/K/V and gate/up are fused into one matmul each (fewer, larger ops). On the CPU the layout follows
the dtype:
- "native", where kernels/cpu.py is built and this CPU has AVX-512 (AVX512-BF16 for bfloat16): plain
  row-major weights; a decode step's few rows run kernels/cpu_linear.c's streaming matmul, which walks
  each thread's weight rows in address order (on AMX CPUs, bfloat16 by tiles of 16 weight rows read in
  place). Measured on this project's 2-core EPYC (the model's 30 layers and head, one row, bfloat16):
  10.5 ms vs 18.0 ms for oneDNN's packed GEMV below, results equal but for float32 summation order; on
  a 2-core Sapphire Rapids, four rows, 12 ms on AMX tiles against 21-28 by vectors and ~37 for
  F.linear. Prefill chunks (more rows) go to F.linear.
- bfloat16 on a CPU that computes it (AVX512-BF16/AMX): every projection is packed once into oneDNN's
  blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, what inductor's freezing pass does) and
  run by `_linear_pointwise`. Measured on this project's 2-core EPYC (30 layers and the head, weights
  streamed from memory, the two taking turns): 15.3 vs 24.2 ms a step at one row, 16.0 vs 32.5 ms at
  eight, with bit-identical results (the same kernel without the per-call reorder of the weight).
- float32: (in, out) storage for one or two rows, where fp32 GEMV runs ~35% faster (30 layers: 39 vs
  61 ms at one row); row-major otherwise. Packing fp32 for batches measured no faster in the engine
  (batch 8 at 512 tokens, one thread, two A/B rounds: 45.2/47.5 tok/s row-major vs 46.4/35.5 packed).
Packing empties the HF modules' weights (holding them twice would double the model's memory); if
HF's own forward is called on that model object (tests, benchmarks) it gets plain copies back first.
The layout is built once per loaded model and shared by every runner over it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvchat_kernels import cpu
from kvchat.engine.arena import WEIGHT_SKEW, Arena
from kvchat.engine.arena import enabled as arena_enabled
from kvchat.engine.arena import trim as trim_heap


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
    """x (N, in) -> (N, out). `packed`: w is in oneDNN's blocked layout (only `__call__` may read it).
    `native`: w is row-major and up to cpu.LINEAR_ROWS contiguous rows go to kernels/cpu.py's streaming
    matmul (a decode step), more to F.linear (a prefill chunk)."""

    __slots__ = ("w", "b", "packed", "native")

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, packed: bool = False, native: bool = False):
        self.w, self.b, self.packed, self.native = w, b, packed, native

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.native and x.shape[0] <= cpu.LINEAR_ROWS and x.is_contiguous():
            return cpu.linear(x, self.w, self.b)
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

    def __init__(self, layers: list[LayerWeights], lm_head: Linear, layout: str, arena: Arena | None = None):
        self.layers, self.lm_head, self.layout = layers, lm_head, layout
        self.arena = arena  # the native weights' huge-page memory (None: where torch put them)

    @staticmethod
    def of(lm, max_slots: int = 1) -> "Weights":
        layout = choose_layout(lm.desc.dtype, lm.desc.device, max_slots)
        cached = getattr(lm, "_kvchat_weights", None)
        if cached is not None and (cached.layout == layout or cached.layout == "packed"):
            return cached  # packed weights are not laid out again: within 25% of the best at any batch
        w = build(lm.hf, layout)
        lm._kvchat_weights = w
        return w


def choose_layout(dtype: torch.dtype, device: torch.device, max_slots: int) -> str:
    """"native" | "packed" | "transposed" | "rows". KVCHAT_NATIVE=0 turns the native matmul off and
    KVCHAT_PACK=0 packing (tests compare the layouts)."""
    if device.type != "cpu":
        return "rows"
    if cpu.enabled() and cpu.linear_ok(dtype):
        return "native"
    pack = os.environ.get("KVCHAT_PACK", "1") != "0"
    if dtype == torch.bfloat16 and pack and packing_works(dtype):
        return "packed"
    return "transposed" if dtype == torch.float32 and max_slots <= 2 else "rows"


_PACK_OK: dict[torch.dtype, bool] = {}


def packing_works(dtype: torch.dtype = torch.bfloat16) -> bool:
    """oneDNN is built in, computes `dtype` on this CPU, and a packed matmul equals F.linear."""
    if dtype not in _PACK_OK:
        try:
            ok = torch.backends.mkldnn.is_available()
            if ok and dtype == torch.bfloat16:
                ok = torch.ops.mkldnn._is_mkldnn_bf16_supported()
            if ok:
                g = torch.Generator().manual_seed(0)
                w = torch.randn(48, 40, generator=g).to(dtype)
                x = torch.randn(3, 40, generator=g).to(dtype)
                got = Linear(torch.ops.mkldnn._reorder_linear_weight(w, 1), None, True)(x)
                ok = torch.allclose(got.float(), F.linear(x, w).float(), rtol=1e-2, atol=1e-2)
        except Exception:  # an op missing from this build: the plain path
            ok = False
        _PACK_OK[dtype] = bool(ok)
    return _PACK_OK[dtype]


def _storage(w: torch.Tensor, layout: str, arena: Arena | None = None) -> torch.Tensor:
    """`w` (out, in) as the layout wants it: a view over (in, out) storage, packed, or row-major (rows,
    native; native weights go into `arena`, on huge pages, when there is one)."""
    if arena is not None and layout == "native":
        return arena.place(w.contiguous())
    if layout == "transposed":
        return w if w.stride(0) == 1 else w.t().contiguous().t()
    if layout == "packed":
        return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 1)
    return w.contiguous()


def _fused(linears: list[torch.nn.Linear], layout: str, arena: Arena | None = None) -> Linear:
    """One Linear over the concatenated weights of `linears` (and biases, if they all have one)."""
    w = torch.cat([m.weight.data for m in linears], dim=0)
    biases = [m.bias for m in linears]
    b = None if any(x is None for x in biases) else torch.cat([x.data for x in biases])
    if layout == "packed":
        # The HF modules can't hold blocked weights; drop their separate copies instead of keeping both.
        for m in linears:
            m.weight.data = torch.empty(0, dtype=w.dtype)
        return Linear(_storage(w, layout), b, True)
    fused = _storage(w, layout, arena)
    off = 0
    for m in linears:  # the HF modules keep views of the fused tensor: nothing is held twice
        n = m.weight.shape[0]
        m.weight.data = fused[off : off + n]
        if b is not None:
            m.bias.data = b[off : off + n]
        off += n
    return Linear(fused, b, native=layout == "native")


def _single(linear: torch.nn.Linear, layout: str, copy: bool = False, arena: Arena | None = None) -> Linear:
    w = _storage(linear.weight.data, layout, arena)
    if not copy:
        linear.weight.data = w if layout != "packed" else torch.empty(0, dtype=w.dtype)
    return Linear(w, linear.bias, layout == "packed", layout == "native")


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
                self.built = Linear(w[:n], b, native=self.qkv.native)
        return self.built(x)


def build(hf, layout: str) -> Weights:
    # Native weights are copied in the order a decode step reads them into huge-page memory (engine/arena.py).
    arena = Arena(skew=0 if cpu.amx() else WEIGHT_SKEW) if layout == "native" and arena_enabled() else None
    layers = []
    tied = hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    for layer in hf.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        n_q = a.q_proj.weight.shape[0]
        qkv = _fused([a.q_proj, a.k_proj, a.v_proj], layout, arena)
        layers.append(LayerWeights(
            in_norm=Norm(layer.input_layernorm), post_norm=Norm(layer.post_attention_layernorm), qkv=qkv,
            q=_QRows(qkv, n_q), q_norm=getattr(a, "q_norm", None), k_norm=getattr(a, "k_norm", None),
            o=_single(a.o_proj, layout, arena=arena), gate_up=_fused([mlp.gate_proj, mlp.up_proj], layout, arena),
            down=_single(mlp.down_proj, layout, arena=arena), act=mlp.act_fn,
        ))
    # A head tied to the embedding keeps its rows for lookups: packed, it is a copy.
    head = _single(hf.lm_head, layout, copy=tied and layout == "packed", arena=arena)
    w = Weights(layers, head, layout, arena)
    if arena is not None:
        trim_heap()
    if layout == "packed":
        _restore_on_forward(hf, w, tied)
    return w


def unpack(lin: Linear) -> torch.Tensor:
    """A packed Linear's plain (out, in) weight, exactly: the packed matmul of the identity (products
    with 1, sums of 0)."""
    eye = torch.eye(lin.w.shape[1], dtype=lin.w.dtype, device=lin.w.device)
    return Linear(lin.w, None, True)(eye).t().contiguous()


def _restore_on_forward(hf, weights: Weights, tied: bool):
    """HF modules can't hold packed weights, so packing empties them; HF's own forward (tests,
    benchmarks) gets plain copies back the first time it runs. Those are a second copy of the weights
    for as long as runners over the packed ones live: fine for a comparison, not for serving."""

    def restore(module, args):
        for layer, lw in zip(hf.model.layers, weights.layers):
            a, mlp = layer.self_attn, layer.mlp
            for parts, lin in (([a.q_proj, a.k_proj, a.v_proj], lw.qkv), ([mlp.gate_proj, mlp.up_proj], lw.gate_up),
                               ([a.o_proj], lw.o), ([mlp.down_proj], lw.down)):
                w, off = unpack(lin), 0
                for m in parts:
                    n = m.out_features
                    m.weight.data = w[off : off + n]
                    off += n
        if not tied:
            hf.lm_head.weight.data = unpack(weights.lm_head)
        handle.remove()

    handle = hf.register_forward_pre_hook(restore)
