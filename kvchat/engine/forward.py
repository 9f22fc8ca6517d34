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

from kvchat_kernels import paged_decode_attention, prefill_attention
from kvchat.methods.base import PrefillCtx


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (N, H, D); cos/sin (N, 1, D): HF's rotate-half RoPE."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def causal_attention(q, k, v, scale, last_w=0):
    """A sequence's first chunk, straight from its K/V: q (T, H_q, D), k/v (T, H_kv, D).

    Same contract as `prefill_attention` with an empty store: -> out (T, H_q, D) [, rows (H_q, w, T)]."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                                         v.transpose(0, 1).unsqueeze(0), is_causal=True, scale=scale,
                                         enable_gqa=True)[0].transpose(0, 1)
    if last_w <= 0:
        return out
    w = min(last_w, T)
    G = Hq // Hkv
    qw = q[T - w :].transpose(0, 1).reshape(Hkv, G * w, D)
    scores = torch.matmul(qw, k.permute(1, 2, 0)).float().view(Hkv, G, w, T) * scale
    causal = torch.arange(T).view(1, T) <= torch.arange(T - w, T).view(w, 1)
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    return out, probs.reshape(Hq, w, T)


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


class Runner:
    """Forward passes for prefill (one slot, a chunk of tokens) and decode (several slots, one token each)."""

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
        self.methods = list(methods)
        self.stats = {"prefill_tokens": 0, "prefill_layer_tokens": 0}

    def _qkv(self, lw: LayerWeights, h: torch.Tensor, cos, sin):
        """h (N, hidden) -> q (N, H_q, D), k, v (N, H_kv, D); RoPE applied to q and k."""
        N = h.shape[0]
        qkv = F.linear(h, lw.w_qkv, lw.b_qkv)
        q, k, v = qkv.split([self.n_q, self.n_kv, self.n_kv], dim=-1)
        q, k, v = q.view(N, -1, self.D), k.view(N, -1, self.D), v.view(N, -1, self.D)
        if lw.q_norm is not None:
            q, k = lw.q_norm(q), lw.k_norm(k)
        return rope(q, cos, sin), rope(k, cos, sin), v

    def _mlp(self, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(lw.post_norm(x), lw.w_gate_up).chunk(2, dim=-1)
        return x + F.linear(lw.act(gate) * up, lw.w_down)

    def _rope_tables(self, x, positions):
        cos, sin = self.rotary(x, positions.view(1, -1))  # (1, N, D)
        return cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # (N, 1, D)

    def logits(self, x_last: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x_last)).float()

    @torch.no_grad()
    def prefill(self, store, slot: int, ids: torch.Tensor, positions: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Run a chunk for one slot on top of what the store holds; -> logits of the chunk's last token,
        or with `all_logits` (T', vocab) of every token still in the residual stream (teacher forcing)."""
        x = self.embed(ids)  # (T, hidden)
        cos, sin = self._rope_tables(x, positions)  # (T, 1, D), gathered alongside x when tokens drop
        self.stats["prefill_tokens"] += ids.shape[0]
        for li, lw in enumerate(self.layers):
            self.stats["prefill_layer_tokens"] += x.shape[0]
            q, k, v = self._qkv(lw, lw.in_norm(x), cos, sin)
            st = store.layers[li]
            start = st.lengths[slot].tolist()
            if store.owns(li):
                st.append_chunk(slot, k, v, positions)
            w = max((m.prefill_rows(li) for m in self.methods), default=0)
            if store.owns(li) and not any(start):
                # Nothing stored before this chunk: attend to its own K/V (no gather; a first chunk
                # carries no logit bias yet, appends write 0).
                res = causal_attention(q, k, v, self.scale, w)
            else:
                res = prefill_attention(q, st.k, st.v, st.table[slot], st.lengths[slot], self.scale,
                                        bias_pool=st.bias, last_w=w)
            attn, rows = res if w else (res, None)
            x = x + F.linear(attn.reshape(x.shape[0], -1), lw.w_o, lw.b_o)
            x = self._mlp(lw, x)
            for m in self.methods:
                keep = m.after_prefill_layer(PrefillCtx(li, slot, store, positions, rows, start))
                if keep is not None:  # the method dropped tokens from the residual stream
                    x, positions, cos, sin = x[keep], positions[keep], cos[keep], sin[keep]
        return self.logits(x) if all_logits else self.logits(x[-1:])[0]

    @torch.no_grad()
    def decode(self, store, slots: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token for each of `slots` (B,); -> logits (B, vocab)."""
        x = self.embed(ids)  # (B, hidden)
        cos, sin = self._rope_tables(x, positions)
        B = ids.shape[0]
        for li, lw in enumerate(self.layers):
            q, k, v = self._qkv(lw, lw.in_norm(x), cos, sin)
            st = store.layers[li]
            if store.owns(li):
                st.append_step(slots, k, v, positions)
            want = any(m.decode_colsum(li) for m in self.methods)
            res = paged_decode_attention(q, st.k, st.v, st.table[slots], st.lengths[slots], self.scale,
                                         bias_pool=st.bias, return_colsum=want)
            attn, colsum = res if want else (res, None)
            x = x + F.linear(attn.reshape(B, -1), lw.w_o, lw.b_o)
            x = self._mlp(lw, x)
            for m in self.methods:
                m.after_decode_layer(li, store, slots, colsum)
        return self.logits(x)
