"""kvchat's own forward pass over the HF model's submodules, reading and writing the paged store.

Transformers gives us loading, the tokenizer, the config, the norms, the MLP activation and the rotary
embedding (so every RoPE scaling variant stays right); the loop below calls them itself so that methods
can drop hidden states between layers, read attention rows and keep ragged per-head caches.
The weights (fused Q/K/V and gate/up, laid out per dtype) are kvchat/engine/weights.py's.
"""

from __future__ import annotations

import os

import torch

from kvchat_kernels import cpu, cpu_layer
from kvchat.cache.stats import StepStats, add_colsum
from kvchat.engine.weights import LayerWeights, Norm, Weights
from kvchat.methods.base import DecodeCtx, PrefillCtx

STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # rope types whose frequencies are fixed at load


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (N, H, D); cos/sin (N, 1, D): HF's rotate-half RoPE."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin (N, 1, D) -> the table `rope_rolled` multiplies: its first half negated."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rope_rolled(x: torch.Tensor, cos: torch.Tensor, sin_s: torch.Tensor) -> torch.Tensor:
    """`rope` in four ops instead of seven, bit for bit: rotate-half is a roll by D/2 with the first
    half's sign moved into the table ((-a) * b == a * (-b) exactly). sin_s from `signed_sin`."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * sin_s


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
        # Frequencies that never follow the sequence length (HF's dynamic and longrope types do): tables cacheable.
        self._rope_static = getattr(self.rotary, "rope_type", None) in STATIC_ROPE
        self._rope_cache: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        self.norm = Norm(hf.model.norm)
        # Fused and laid out for the GEMMs this runner will mostly do (kvchat/engine/weights.py).
        self.weights = Weights.of(lm, max_slots)
        self.layers, self.lm_head = self.weights.layers, self.weights.lm_head
        self.scale = getattr(hf.model.layers[0].self_attn, "scaling", d.head_dim**-0.5)
        self.n_q, self.n_kv, self.D = d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim, d.head_dim
        self.group = d.n_heads // d.n_kv_heads
        self.methods = list(methods)
        self.native = self._native_ok(lm)
        # a whole layer per native call (kernels/cpu_layer.c) where the store allows; KVCHAT_FUSED_LAYER=0 off
        self.fused = self.native and self._fused_ok() and os.environ.get("KVCHAT_FUSED_LAYER", "1") != "0"
        self._fused_layers: dict[tuple[int, bool], cpu_layer.DecodeLayer] = {}
        self._scratch = cpu_layer.Scratch()
        self.stats = {"prefill_tokens": 0, "prefill_layer_tokens": 0, "kv_projections": 0}

    def _native_ok(self, lm) -> bool:
        """Decode runs kernels/cpu.py's fused ops: a CPU model in float32/bfloat16 whose norms are plain
        RMSNorms, whose MLP is SiLU-gated and which has no Q/K norms (chosen once; KVCHAT_NATIVE=0 off)."""
        if lm.desc.device.type != "cpu" or lm.desc.dtype not in (torch.float32, torch.bfloat16) or not cpu.enabled():
            return False
        norms = [self.norm] + [n for lw in self.layers for n in (lw.in_norm, lw.post_norm)]
        return (all(n.fused and n.weight.dtype == lm.desc.dtype and n.weight.is_contiguous() for n in norms)
                and all(lw.q_norm is None and type(lw.act).__name__ in ("SiLU", "SiLUActivation") for lw in self.layers))

    def _fused_ok(self) -> bool:
        """Every projection is a native row-major Linear of the model's dtype (weights.py's "native"
        layout) and the attention shape is one kernels/cpu_layer.c takes."""
        lins = [lin for lw in self.layers for lin in (lw.qkv, lw.o, lw.gate_up, lw.down)]
        dtype = self.desc.dtype
        return (all(lin.native and lin.w.dtype == dtype and lin.w.is_contiguous() for lin in lins)
                and cpu_layer.DecodeLayer.ok(dtype, self.n_q // self.D, self.n_kv // self.D, self.D))

    def _layer_call(self, li: int, owns: bool) -> cpu_layer.DecodeLayer:
        """Layer li's native call, its weights bound on first use (owns=False: the Q rows only)."""
        f = self._fused_layers.get((li, owns))
        if f is None:
            lw, n = self.layers[li], self.n_q
            nxt = self.layers[li + 1].in_norm if li + 1 < len(self.layers) else self.norm
            qkv = lw.qkv
            w_in, b_in = (qkv.w, qkv.b) if owns else (qkv.w[:n], None if qkv.b is None else qkv.b[:n])
            f = self._fused_layers[(li, owns)] = cpu_layer.DecodeLayer(
                w_in, b_in, lw.o.w, lw.o.b, lw.gate_up.w, lw.gate_up.b, lw.down.w, lw.down.b, lw.post_norm.weight,
                lw.post_norm.eps, nxt.weight, nxt.eps, n // self.D, self.n_kv // self.D, self.D, owns)
        return f

    def _qkv(self, lw: LayerWeights, h: torch.Tensor, cos, sin_s):
        """h (N, hidden) -> q (N, H_q, D), k_pre, k, v (N, H_kv, D); RoPE applied to q and k (k_pre is
        the key before RoPE: what a low-rank format stores). q, k and v are views of one matmul's
        output; q and k are rotated in one call."""
        N, nq, nk, D = h.shape[0], self.n_q, self.n_kv, self.D
        self.stats["kv_projections"] += N
        qkv = lw.qkv(h)  # (N, nq + 2 nk)
        v = qkv[:, nq + nk :].view(N, -1, D)
        k_pre = qkv[:, nq : nq + nk].view(N, -1, D)
        if lw.q_norm is not None:
            q, k_pre = lw.q_norm(qkv[:, :nq].view(N, -1, D)), lw.k_norm(k_pre)
            return rope_rolled(q, cos, sin_s), k_pre, rope_rolled(k_pre, cos, sin_s), v
        qk = rope_rolled(qkv[:, : nq + nk].view(N, -1, D), cos, sin_s)  # (N, H_q + H_kv, D)
        Hq = nq // D
        return qk[:, :Hq], k_pre, qk[:, Hq:], v

    def _q(self, lw: LayerWeights, h: torch.Tensor, cos, sin_s):
        """h (N, hidden) -> q (N, H_q, D) only: a layer reading another layer's store."""
        N = h.shape[0]
        q = lw.q(h).view(N, -1, self.D)
        if lw.q_norm is not None:
            q = lw.q_norm(q)
        return rope_rolled(q, cos, sin_s)

    def _norm(self, norm: Norm, x: torch.Tensor) -> torch.Tensor:
        """A prefill chunk's RMSNorm: the native one where this runner decodes natively (one call over
        the chunk's rows, the same roundings as HF's module; half F.rms_norm's time in bfloat16)."""
        if self.native and x.is_contiguous():
            return cpu.add_rms_norm(x, None, norm.weight, norm.eps)[1]
        return norm(x)

    def _mlp(self, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        gu = lw.gate_up(self._norm(lw.post_norm, x))  # (N, 2 I): gate then up
        if self.native and gu.is_contiguous():
            return x + lw.down(cpu.silu_mul(gu))
        gate, up = gu.chunk(2, dim=-1)
        return x + lw.down(lw.act(gate) * up)

    def _rope_tables(self, x, positions):
        cos, sin = self.rotary(x, positions.view(1, -1))  # (1, N, D)
        return cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # (N, 1, D)

    def _rope_signed(self, x, positions):
        """-> cos, signed sin (N, 1, D) for `rope_rolled`: computed once a forward, shared by every layer.
        Rows of tables built once per dtype where the rotary's frequencies are fixed at load (`_rope_static`):
        its values are elementwise in the position, so a row is bit for bit what a call at that position
        gives, for ~10 us a step instead of ~10 small ops (0.2-0.4 ms a decode step)."""
        if not self._rope_static or positions.numel() == 0:
            cos, sin = self._rope_tables(x, positions)
            return cos, signed_sin(sin)
        tables = self._rope_cache.get(x.dtype)
        top = int(positions.max()) + 1
        if tables is None or top > tables[0].shape[0]:
            n = max(top, 4096, 0 if tables is None else 2 * tables[0].shape[0])
            cos, sin = self._rope_tables(x[:0], torch.arange(n, device=x.device))
            self._rope_cache[x.dtype] = tables = (cos, signed_sin(sin))
        return tables[0].index_select(0, positions), tables[1].index_select(0, positions)

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
        cos, sin = self._rope_signed(x, positions)  # (T, 1, D), gathered alongside x when tokens drop
        self.stats["prefill_tokens"] += ids.shape[0]
        store.stats = {}
        for li, lw in enumerate(self.layers):
            self.stats["prefill_layer_tokens"] += x.shape[0]
            h = self._norm(lw.in_norm, x)
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
            x = x + lw.o(attn.reshape(x.shape[0], -1))
            x = self._mlp(lw, x)
            for m in methods:
                keep = m.after_prefill_layer(PrefillCtx(li, slot, store, positions, stats, start))
                if keep is not None:  # the method dropped tokens from the residual stream
                    x, positions, cos, sin = x[keep], positions[keep], cos[keep], sin[keep]
            if should_stop is not None and should_stop(li):
                raise PrefillStopped(li)
        if out == "hidden":
            return self._norm(self.norm, x)
        return self.logits(x) if out == "logits" else self.logits(x[-1:])[0]

    @torch.no_grad()
    def decode(self, store, slots: list[int], slots_t: torch.Tensor, ids: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor:
        """One token for each of `slots` (B,); -> logits (B, vocab)."""
        if self.native:
            return self._decode_native(store, slots, slots_t, ids, positions)
        x = self.embed(ids)  # (B, hidden)
        cos, sin = self._rope_signed(x, positions)  # once a step, for every layer
        B = ids.shape[0]
        store.stats = {}
        for li, lw in enumerate(self.layers):
            h = lw.in_norm(x)
            if store.owns(li):
                q, k_pre, k, v = self._qkv(lw, h, cos, sin)
                attn = self._attend_step(store, li, slots, slots_t, q, (k_pre, k, v, positions))
            else:
                attn = self._attend_step(store, li, slots, slots_t, self._q(lw, h, cos, sin))
            x = x + lw.o(attn.view(B, -1))
            x = self._mlp(lw, x)
            self._after_step_layer(store, li, slots)
        return self.logits(x)

    def _attend_step(self, store, li, slots, slots_t, q, append=None) -> torch.Tensor:
        """A decode layer's store work, the same on both paths: append (k_pre, k, v, positions) when the
        layer owns storage (every method counts the new token before any of them evicts), then attention
        with column sums if a method asks; the step's statistics go to store.stats[li]. -> attn (B, H_q, D)."""
        fmt, methods = store.layers[li], self.methods
        if append is not None:
            fmt.append_step(slots, slots_t, *append)
            for m in methods:
                m.on_append(li, slots, 1)
        want, into = self._colsum_plan(li)
        attn, colsum = fmt.attend_decode(q, slots, slots_t, self.scale, want)
        self._step_stats(store, li, slots, colsum, into)
        return attn

    def _colsum_plan(self, li: int) -> tuple[bool, list]:
        """-> whether a method wants layer li's column sums this step, and the running-score buffers of
        those that take them there (`Method.decode_colsum_into`; None for one that reads ctx.colsum)."""
        if not self.methods:
            return False, []
        into = [m.decode_colsum_into(li) for m in self.methods if m.decode_colsum(li)]
        return bool(into), into

    def _step_stats(self, store, li, slots, colsum, into) -> None:
        """Layer li's StepStats; the column sums added into the buffers that take them (if the kernel
        has not: colsum None)."""
        if colsum is not None:
            for buf in into:
                if buf is not None:
                    add_colsum(buf, slots, colsum)
        store.stats[li] = StepStats(self.group, colsum=colsum, slots=slots)

    def _after_step_layer(self, store, li, slots) -> None:
        if self.methods:
            ctx = DecodeCtx(li, store, slots, store.stats[li])
            for m in self.methods:
                m.after_decode_layer(ctx)

    def _decode_native(self, store, slots, slots_t, ids, positions) -> torch.Tensor:
        """`decode` with a layer's small ops fused (kernels/cpu.py): each residual add with the norm after
        it, RoPE of q and k, SiLU-and-multiply; the matmuls are the same Linear calls. Same results as the
        torch path to float32 summation order (one bfloat16 rounding in attention). Layers on a dense
        store go further: the same calls chained in C, a run of layers at a time (`_fused_run`), bit for
        bit what this loop computes."""
        x = self.embed(ids)  # (B, hidden), a fresh tensor: updated in place below
        cos, sin = self._rope_signed(x, positions)
        B, D, Hq = ids.shape[0], self.D, self.n_q // self.D
        Hk = self.n_kv // self.D
        store.stats = {}
        layers = self.layers
        first = layers[0].in_norm
        x, h = cpu.add_rms_norm(x, None, first.weight, first.eps)
        fused = self.fused and B <= cpu.LINEAR_ROWS
        pos32 = positions.to(torch.int32) if fused else None
        li = 0
        while li < len(layers):
            if fused and store.layers[li].native_layer:
                li = self._fused_run(store, li, slots, slots_t, x, h, cos, sin, pos32)
                continue
            lw = layers[li]
            if store.owns(li):
                self.stats["kv_projections"] += B
                qkv = lw.qkv(h)  # (B, nq + 2 nk)
                qk = cpu.rope(qkv, Hq + Hk, D, cos, sin)  # (B, H_q + H_kv, D)
                k_pre = qkv[:, self.n_q : self.n_q + self.n_kv].view(B, -1, D)
                v = qkv[:, self.n_q + self.n_kv :].view(B, -1, D)
                attn = self._attend_step(store, li, slots, slots_t, qk[:, :Hq], (k_pre, qk[:, Hq:], v, positions))
            else:
                attn = self._attend_step(store, li, slots, slots_t, cpu.rope(lw.q(h), Hq, D, cos, sin))
            x, h = cpu.add_rms_norm(x, lw.o(attn.reshape(B, -1)), lw.post_norm.weight, lw.post_norm.eps)
            nxt = layers[li + 1].in_norm if li + 1 < len(layers) else self.norm
            x, h = cpu.add_rms_norm(x, lw.down(cpu.silu_mul(lw.gate_up(h))), nxt.weight, nxt.eps)
            self._after_step_layer(store, li, slots)
            li += 1
        return self.lm_head(h).float()

    def _fused_run(self, store, first, slots, slots_t, x, h, cos, sin_s, pos32) -> int:
        """Layers from `first` on, while their stores are dense and no method needs to act between them
        (`Method.decode_barrier`; with methods, a layer whose store a later layer reads ends a run), in one
        native call: x and h updated in place. Each layer's store bookkeeping and the methods' counting
        are done first, in layer order, as `_attend_step` does them; the layers' statistics and hooks
        follow the call, in layer order. -> the layer after the run."""
        methods, n = self.methods, len(self.layers)
        B, run, keep, li = len(slots), [], [], first
        read_later = set(store.aliases.values())  # layers whose store a later layer reads
        while li < n and store.layers[li].native_layer:
            fmt, owns = store.layers[li], store.owns(li)
            if owns:  # the append's rows and the tables after it, in one pass
                self.stats["kv_projections"] += B
                rows, table, lengths, mx, mn = fmt.pages.step(slots, slots_t)
                rows = cpu.rows_array(rows)
                for m in methods:
                    m.on_append(li, slots, 1)
            else:
                rows, (table, lengths, mx, mn) = None, fmt.pages.step_tables(slots, slots_t)
            want, into = self._colsum_plan(li)
            direct = into[0] if len(into) == 1 else None  # the kernel adds into the one buffer that takes them
            f = self._layer_call(li, owns)
            colsum = f.prepare(B, cos, sin_s, fmt.k, fmt.v, fmt.pages.pools["pos"], fmt.bias, rows, pos32, table,
                               lengths, mx, mn, self.scale, want, direct, slots_t)
            run.append(f)
            keep.append((li, colsum, into, rows, table, lengths))  # alive until the call returns
            li += 1
            if methods and (li - 1 in read_later or any(m.decode_barrier(li - 1) for m in methods)):
                break
        cpu_layer.run(run, x, h, self._scratch)
        if methods:  # the statistics are the methods' (no method: no column sums, nobody reads them)
            for layer, colsum, into, *_ in keep:
                self._step_stats(store, layer, slots, colsum, into)
            for layer, *_ in keep:
                self._after_step_layer(store, layer, slots)
        return li
