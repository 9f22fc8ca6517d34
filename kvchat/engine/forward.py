"""kvchat's own forward pass over the HF model's submodules, reading and writing the paged store.

Transformers gives us loading, the tokenizer, the config, the norms, the MLP activation and the rotary
embedding (so every RoPE scaling variant stays right); the loop below calls them itself so that methods
can drop hidden states between layers, read attention rows and keep ragged per-head caches.
Q/K/V and gate/up projections are fused into one matmul each: fewer, larger ops are what a CPU needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvchat.cache.stats import StepStats
from kvchat.methods.base import DecodeCtx, PrefillCtx


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (N, H, D); cos/sin (N, 1, D): HF's rotate-half RoPE."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class LayerWeights:
    in_norm: torch.nn.Module
    post_norm: torch.nn.Module
    w_qkv: torch.Tensor
    b_qkv: torch.Tensor | None
    q_norm: torch.nn.Module | None
    k_norm: torch.nn.Module | None
    w_o: torch.Tensor
    b_o: torch.Tensor | None
    w_gate_up: torch.Tensor
    w_down: torch.Tensor
    act: object


def _storage(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """`w` (out, in) as a view over row-major (out, in) or (in, out) storage.

    fp32 GEMV with one or two rows runs ~35% faster from (in, out) storage on this CPU (30 layers:
    22 vs 34 ms); from four rows on, and in bf16, row-major (out, in) is as fast or faster."""
    if transposed:
        return w if w.stride(0) == 1 else w.t().contiguous().t()
    return w.contiguous()


def _fuse(linears: list[torch.nn.Linear], attr: str, transposed: bool) -> torch.Tensor | None:
    parts = [getattr(m, attr) for m in linears]
    if any(p is None for p in parts):
        return None
    fused = torch.cat([p.data for p in parts], dim=0)
    if fused.dim() == 2:
        fused = _storage(fused, transposed)
    # Point the HF modules at views of the fused tensor so the weights are not held twice.
    off = 0
    for m, p in zip(linears, parts):
        n = p.shape[0]
        getattr(m, attr).data = fused[off : off + n]
        off += n
    return fused


def _relayout(linear: torch.nn.Module, transposed: bool) -> torch.Tensor:
    linear.weight.data = _storage(linear.weight.data, transposed)
    return linear.weight


def layer_weights(layer, transposed: bool = False) -> LayerWeights:
    a, mlp = layer.self_attn, layer.mlp
    w_qkv = _fuse([a.q_proj, a.k_proj, a.v_proj], "weight", transposed)
    b_qkv = _fuse([a.q_proj, a.k_proj, a.v_proj], "bias", transposed)
    w_gu = _fuse([mlp.gate_proj, mlp.up_proj], "weight", transposed)
    return LayerWeights(
        in_norm=layer.input_layernorm, post_norm=layer.post_attention_layernorm, w_qkv=w_qkv, b_qkv=b_qkv,
        q_norm=getattr(a, "q_norm", None), k_norm=getattr(a, "k_norm", None), w_o=_relayout(a.o_proj, transposed),
        b_o=a.o_proj.bias, w_gate_up=w_gu, w_down=_relayout(mlp.down_proj, transposed), act=mlp.act_fn,
    )


class PrefillStopped(Exception):
    """`should_stop` asked to stop a prefill between layers; `layer` is the last layer that ran."""

    def __init__(self, layer: int):
        super().__init__(layer)
        self.layer = layer


class Runner:
    """Forward passes for prefill (one slot, a chunk of tokens) and decode (several slots, one token each).

    Each layer either owns storage (computes Q, K, V and appends K/V to its format) or reads an earlier
    layer's store (computes Q only: its K/V projections are skipped, the compute KVSharer saves)."""

    def __init__(self, lm, methods=(), max_slots: int = 1):
        hf = lm.hf
        self.desc = d = lm.desc
        self.embed = hf.model.embed_tokens
        self.rotary = hf.model.rotary_emb
        self.norm = hf.model.norm
        self.lm_head = hf.lm_head
        # Weight layout for the GEMMs this runner will mostly do (see _storage); the HF modules keep
        # views of the same storage, so nothing is held twice.
        self.transposed = d.dtype == torch.float32 and d.device.type == "cpu" and max_slots <= 2
        self.layers = [layer_weights(l, self.transposed) for l in hf.model.layers]
        _relayout(self.lm_head, self.transposed)  # tied to the embedding: row lookups don't mind
        self.scale = getattr(hf.model.layers[0].self_attn, "scaling", d.head_dim**-0.5)
        self.n_q, self.n_kv, self.D = d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim, d.head_dim
        self.group = d.n_heads // d.n_kv_heads
        self.methods = list(methods)
        self.stats = {"prefill_tokens": 0, "prefill_layer_tokens": 0, "kv_projections": 0}

    def _qkv(self, lw: LayerWeights, h: torch.Tensor, cos, sin):
        """h (N, hidden) -> q (N, H_q, D), k_pre, k, v (N, H_kv, D); RoPE applied to q and k (k_pre is
        the key before RoPE: what a low-rank format stores)."""
        N = h.shape[0]
        self.stats["kv_projections"] += N
        qkv = F.linear(h, lw.w_qkv, lw.b_qkv)
        q, k, v = qkv.split([self.n_q, self.n_kv, self.n_kv], dim=-1)
        q, k, v = q.view(N, -1, self.D), k.view(N, -1, self.D), v.view(N, -1, self.D)
        if lw.q_norm is not None:
            q, k = lw.q_norm(q), lw.k_norm(k)
        return rope(q, cos, sin), k, rope(k, cos, sin), v

    def _q(self, lw: LayerWeights, h: torch.Tensor, cos, sin):
        """h (N, hidden) -> q (N, H_q, D) only: a layer reading another layer's store."""
        N = h.shape[0]
        b = None if lw.b_qkv is None else lw.b_qkv[: self.n_q]
        q = F.linear(h, lw.w_qkv[: self.n_q], b).view(N, -1, self.D)
        if lw.q_norm is not None:
            q = lw.q_norm(q)
        return rope(q, cos, sin)

    def _mlp(self, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(lw.post_norm(x), lw.w_gate_up).chunk(2, dim=-1)
        return x + F.linear(lw.act(gate) * up, lw.w_down)

    def _rope_tables(self, x, positions):
        cos, sin = self.rotary(x, positions.view(1, -1))  # (1, N, D)
        return cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # (N, 1, D)

    def rotate(self, k: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Keys k (N, D) rotated at positions `old` -> the same keys at positions `new`. RoPE rotations
        compose, so rotating by (new - old) moves them; a scaled RoPE's attention factor is divided out."""
        delta = (new.long() - old.long()).view(-1)
        cos, sin = self.rotary(k.unsqueeze(0), delta.view(1, -1))  # (1, N, D)
        f = getattr(self.rotary, "attention_scaling", 1.0) or 1.0
        return rope(k.unsqueeze(1), cos[0].unsqueeze(1) / f, sin[0].unsqueeze(1) / f)[:, 0].to(k.dtype)

    def logits(self, x_last: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x_last)).float()

    @torch.no_grad()
    def prefill(self, store, slot: int, ids: torch.Tensor, positions: torch.Tensor, out: str = "last",
                methods=None, trace=None, should_stop=None) -> torch.Tensor:
        """Run a chunk for one slot on top of what the store holds.

        out: "last" -> logits of the chunk's last token (vocab,); "logits" -> (T', vocab) for every token
        still in the residual stream at the end; "hidden" -> their final normed hidden states (T', hidden).
        `trace(layer, tensors)` sees each layer's h (normed input), q, k_pre, k, v (None for a layer
        reading another's store) and rows (calibrations). `should_stop(layer)` is asked after each layer;
        True raises PrefillStopped (the caller rolls the chunk back)."""
        methods = self.methods if methods is None else methods
        x = self.embed(ids)  # (T, hidden)
        cos, sin = self._rope_tables(x, positions)  # (T, 1, D), gathered alongside x when tokens drop
        self.stats["prefill_tokens"] += ids.shape[0]
        store.stats = {}
        for li, lw in enumerate(self.layers):
            self.stats["prefill_layer_tokens"] += x.shape[0]
            h = lw.in_norm(x)
            fmt = store.format(li)
            if store.owns(li):
                q, k_pre, k, v = self._qkv(lw, h, cos, sin)
                start = store.chunk_start[li] = list(fmt.host[slot])
                fmt.append_chunk(slot, k_pre, k, v, positions)
                for m in methods:  # every method counts the new tokens before any of them evicts
                    m.on_append(li, [slot], k.shape[0])
                fresh = (k, v)
            else:  # reads an earlier layer's store, which already holds this chunk
                q, k_pre, k, v, fresh = self._q(lw, h, cos, sin), None, None, None, None
                start = store.chunk_start[store.owner(li)]
            w = max((m.prefill_rows(li) for m in methods), default=0)
            attn, rows = fmt.attend_prefill(q, slot, positions, self.scale, w, fresh)
            stats = store.stats[li] = StepStats(self.group, rows=rows, slot=slot)
            if trace is not None:
                trace(li, {"h": h, "q": q, "k_pre": k_pre, "k": k, "v": v, "rows": rows})
            x = x + F.linear(attn.reshape(x.shape[0], -1), lw.w_o, lw.b_o)
            x = self._mlp(lw, x)
            for m in methods:
                keep = m.after_prefill_layer(PrefillCtx(li, slot, store, positions, stats, start))
                if keep is not None:  # the method dropped tokens from the residual stream
                    x, positions, cos, sin = x[keep], positions[keep], cos[keep], sin[keep]
            if should_stop is not None and should_stop(li):
                raise PrefillStopped(li)
        if out == "hidden":
            return self.norm(x)
        return self.logits(x) if out == "logits" else self.logits(x[-1:])[0]

    @torch.no_grad()
    def decode(self, store, slots: list[int], slots_t: torch.Tensor, ids: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor:
        """One token for each of `slots` (B,); -> logits (B, vocab)."""
        x = self.embed(ids)  # (B, hidden)
        cos, sin = self._rope_tables(x, positions)
        B = ids.shape[0]
        store.stats = {}
        for li, lw in enumerate(self.layers):
            h = lw.in_norm(x)
            fmt = store.format(li)
            if store.owns(li):
                q, k_pre, k, v = self._qkv(lw, h, cos, sin)
                fmt.append_step(slots, slots_t, k_pre, k, v, positions)
                for m in self.methods:  # every method counts the new token before any of them evicts
                    m.on_append(li, slots, 1)
            else:
                q = self._q(lw, h, cos, sin)
            want = any(m.decode_colsum(li) for m in self.methods)
            attn, colsum = fmt.attend_decode(q, slots_t, self.scale, want)
            stats = store.stats[li] = StepStats(self.group, colsum=colsum, slots=slots)
            x = x + F.linear(attn.reshape(B, -1), lw.w_o, lw.b_o)
            x = self._mlp(lw, x)
            ctx = DecodeCtx(li, store, slots, stats)
            for m in self.methods:
                m.after_decode_layer(ctx)
        return self.logits(x)
