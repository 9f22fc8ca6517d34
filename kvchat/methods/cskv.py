"""cskv: CSKV, keys and values held as low-rank features beside a full-precision window
(https://arxiv.org/abs/2409.10593; official code github.com/wln20/CSKV).

What is held. Per layer and KV head a sealed token keeps r_k = k_density x head_dim numbers for its key and
r_v = v_density x head_dim for its value (in the model's dtype), and its position. The `window` newest
tokens (the sealed base's full-precision tail) and any policy's pinned tokens stay as they are; older
tokens are sealed `group` at a time into features and nothing full-width is kept for them. Factors
(kvchat/calibration/cskv.py): c = (x - mu) @ down, x_hat = mu + c @ up per head, from the centred PCA of
the calibration text's pre-RoPE keys and values (the closed-form optimum of the paper's loss), optionally
refined on the layer's attention output. A density of 1.0 stores the vector itself (identity factors).

Keys are compressed before RoPE: on SmolLM2 rank 16 of 64 leaves 5.7% of the pre-RoPE keys' energy on
held-out text but 14.5% of the RoPE'd keys'. A sealed key is rebuilt and rotated at its stored position
when attended: a RoPE'd key does not fold into the query (the rotation differs per token, so q R_p up
costs as much as rebuilding), which makes decode O(T r_k D) per head. Values fold: the softmax-weighted
sum runs over the features (T r_v) and is lifted once per query (r_v D). The tail holds keys after RoPE;
sealing un-rotates them at their stored positions (exact up to rounding in the stored dtype) instead of
keeping k_pre beside them, which would add window x D values per head for no measurable gain.
At prefill the chunk attends to its own full K/V (it sits in the tail; sealing follows the prefill), as
in the paper; decode steps and later turns read the features. `reposition` rewrites sealed positions
only (their keys are stored before RoPE).

Deviations from the paper: ranks are per KV head, not one rank jointly over all heads (policies evict per
head, so one token's feature cannot span heads); the factors carry a mean (affine), which the paper's
A B lacks. `bits` 2 or 4 quantizes the feature rows the KIVI way (methods/cskv_quant.py, profile
cskv-kivi4): it overrides `token_specs` / `group_specs`, `encode_features` and `decode_features`, the only
places the feature rows are written and read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvchat.cache.attention import Part, partial
from kvchat.cache.dense import DenseFormat
from kvchat.cache.sealed import SealedFormat
from kvchat.calibration.cache import cache_path, read_tensors, write_tensors
from kvchat.calibration.cskv import moments, pca_factors, refine
from kvchat.calibration.data import data_key, samples
from kvchat.errors import KvchatError, ProfileError
from kvchat.methods.base import Method

FACTORS = ("k_mu", "k_down", "k_up", "v_mu", "v_down", "v_up")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rope:
    """The model's RoPE at stored positions, from its own rotary embedding (the probe's `rope_tables`),
    grown on demand and shared by every layer's format: cos/sin (P, D) in the model's dtype for the
    forward's own arithmetic, and one complex table (P, D/2) for attention. Rotate-half RoPE turns the
    pair (x_i, x_i+D/2) by angle p w_i: in interleaved order (x_0, x_32, x_1, x_33, ...) that is one
    complex multiply per pair, ~6x faster here than gathering cos and sin and rotating halves."""

    def __init__(self, tables, dtype: torch.dtype, device: torch.device):
        self._tables, self.dtype = tables, dtype
        self.cos = self.sin = torch.zeros(0, 0, dtype=dtype, device=device)
        self.turn = torch.zeros(0, 0, dtype=torch.complex64, device=device)

    def _grow(self, pos: torch.Tensor) -> torch.Tensor:
        pos = pos.long()
        need = int(pos.max()) + 1 if pos.numel() else 0
        if need > self.cos.shape[0]:
            n = max(need, 2 * self.cos.shape[0], 1024)
            cos, sin = self._tables(torch.arange(n), self.dtype)
            self.cos, self.sin = cos[:, 0], sin[:, 0]
            c32, s32 = (t[:, 0].float() for t in self._tables(torch.arange(n), torch.float32))
            h = c32.shape[-1] // 2
            if not (torch.equal(c32[:, :h], c32[:, h:]) and torch.equal(s32[:, :h], s32[:, h:])):
                raise KvchatError("cskv: this model's RoPE does not turn dims i and i+D/2 together (rotate-half)")
            self.turn = torch.complex(c32[:, :h], s32[:, :h])
        return pos

    def at(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos (...) -> cos, sin (..., D)."""
        pos = self._grow(pos)
        return self.cos[pos], self.sin[pos]

    def rotate(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Keys before RoPE x (..., D) in the model's dtype -> after, the forward's own arithmetic."""
        cos, sin = self.at(pos)
        return x * cos + _rotate_half(x) * sin

    def rotate_interleaved(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Keys before RoPE in interleaved order x (..., D) float32, pos (...) -> after RoPE, same order."""
        pos = self._grow(pos)
        turn = self.turn.index_select(0, pos.reshape(-1)).view(*pos.shape, -1)
        return torch.view_as_real(torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2)) * turn).flatten(-2)

    def unrotate(self, k: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Keys after RoPE (..., D) -> before, float32 (divides out a scaled RoPE's factor too)."""
        cos, sin = (t.float() for t in self.at(pos))
        k = k.float()
        return (k * cos - _rotate_half(k) * sin) / (cos * cos + sin * sin)


def interleave(D: int) -> torch.Tensor:
    """Dims in interleaved order: (0, D/2, 1, D/2 + 1, ...)."""
    return torch.arange(D).view(2, D // 2).t().reshape(-1)


class _Tail(DenseFormat):
    """The dense tail, telling its format which head it reads: SealedFormat.seal reads a head's tail
    tokens right before it encodes them, and `encode` (no head argument) needs that head's factors."""

    def __init__(self, owner, *args, **kw):
        super().__init__(*args, **kw)
        self._owner = owner

    def read(self, slot, head, idx=None):
        self._owner._head = head
        return super().read(slot, head, idx)


class CSKVFormat(SealedFormat):
    name = "cskv"
    chunk_groups = 64  # sealed groups rebuilt per attention step: 1,024 tokens, 2 steps at 2k tokens

    def __init__(self, n_slots, n_kv, head_dim, block_size, dtype, device, with_bias=False, *, factors: dict,
                 rope: Rope, **kw):
        self.fac, self.rope = factors, rope  # factors: FACTORS of this layer, (H, ...) float32
        self.k_rank, self.v_rank = factors["k_down"].shape[-1], factors["v_down"].shape[-1]
        self._head = 0  # the head `encode` / `decode` work for (set by read, write and the tail)
        eye = torch.eye(head_dim, device=device)
        self._ident = {n: bool((factors[f"{n}_down"] == eye).all() and (factors[f"{n}_up"] == eye).all()
                               and not factors[f"{n}_mu"].any()) if factors[f"{n}_down"].shape[-1] == head_dim
                       else False for n in ("k", "v")}  # identity factors: store the vector itself, exactly
        self._perm = interleave(head_dim).to(device)
        self._k_mu_i, self._k_up_i = factors["k_mu"][:, self._perm], factors["k_up"][..., self._perm].contiguous()
        super().__init__(n_slots, n_kv, head_dim, block_size, dtype, device, with_bias, **kw)
        self.tail = _Tail(self, n_slots, n_kv, head_dim, block_size, dtype, device, with_bias)

    # ---- feature rows: what a quantizing subclass replaces ---------------------------------------------
    def token_specs(self) -> dict:
        return {"ck": ((self.k_rank,), self.dtype), "cv": ((self.v_rank,), self.dtype)}

    def encode_features(self, ck: torch.Tensor, cv: torch.Tensor, count: torch.Tensor) -> tuple[dict, dict]:
        """Features ck (N, group, r_k), cv (N, group, r_v) float32 -> (token rows, group rows)."""
        return {"ck": ck.to(self.dtype), "cv": cv.to(self.dtype)}, {}

    def decode_features(self, tok: dict, grp: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Gathered rows of M groups -> ck (M, group, r_k), cv (M, group, r_v) float32."""
        return tok["ck"].float(), tok["cv"].float()

    # ---- factors -------------------------------------------------------------------------------------
    def _down(self, x: torch.Tensor, name: str, h: int) -> torch.Tensor:
        if self._ident[name]:
            return x.float()
        return (x.float() - self.fac[f"{name}_mu"][h]) @ self.fac[f"{name}_down"][h]

    def _up(self, c: torch.Tensor, name: str, h: int | None = None) -> torch.Tensor:
        """Features (..., r) of head h, or (B, H, N, r) of every head when h is None -> (..., D) float32."""
        if self._ident[name]:
            return c
        mu, up = self.fac[f"{name}_mu"], self.fac[f"{name}_up"]
        if h is not None:
            return mu[h] + c @ up[h]
        return mu.view(1, -1, 1, mu.shape[-1]) + torch.einsum("bhnr,hrd->bhnd", c, up)

    def encode(self, k, v, pos, count):
        h = self._head
        top = torch.iinfo(self.tok["pos"].dtype).max
        if pos.numel() and int(pos.max()) > top:  # the engine stops before max_positions: never, but never silently
            raise KvchatError(f"cskv: position {int(pos.max()):,} does not fit the {self.tok['pos'].dtype} positions "
                              f"chosen for this model (at most {top:,})")
        return self.encode_features(self._down(self.rope.unrotate(k, pos), "k", h), self._down(v, "v", h), count)

    def decode(self, tok, grp, pos):
        h = self._head
        ck, cv = self.decode_features(tok, grp)
        k = self.rope.rotate(self._up(ck, "k", h).to(self.dtype), pos)
        return k, self._up(cv, "v", h).to(self.dtype)

    def read(self, slot, head, idx=None):
        self._head = head
        return super().read(slot, head, idx)

    def write(self, slot, head, idx, tokens):
        self._head = head
        super().write(slot, head, idx, tokens)

    # ---- attention over the features ---------------------------------------------------------------
    def _chunk_ids(self, slots: list[int], c0: int, C: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ids and counts (B, H, C) of groups c0..c0+C of each (slot, head); 0 past a head's groups."""
        ids = torch.zeros(len(slots), self.n_kv, C, dtype=torch.long)
        cnt = torch.zeros_like(ids)
        for b, s in enumerate(slots):
            for h in range(self.n_kv):
                g = self.groups[s][h][c0 : c0 + C]
                ids[b, h, : len(g)] = torch.tensor(g, dtype=torch.long)
                cnt[b, h, : len(g)] = torch.tensor(self.counts[s][h][c0 : c0 + C], dtype=torch.long)
        return ids, cnt

    def _keys(self, ck: torch.Tensor) -> torch.Tensor:
        """Key features (B, H, N, r_k) float32 -> keys before RoPE (B, H, N, D) in interleaved order."""
        if self._ident["k"]:
            return ck[..., self._perm]
        B, H, N, r = ck.shape
        mu, up = self._k_mu_i.repeat(B, 1).view(B * H, 1, -1), self._k_up_i.repeat(B, 1, 1)
        return torch.baddbmm(mu, ck.reshape(B * H, N, r), up).view(B, H, N, -1)

    def _sealed_parts(self, qg: torch.Tensor, slots: list[int], scale: float, visible=None):
        """The base's contract (Part over (B, H_kv, R), per-chunk (scores, valid)) with keys rebuilt and
        rotated per chunk (in interleaved order, queries likewise: a dot product does not mind), and
        values folded: the weighted sum runs over features and is lifted once at the end."""
        B, H, R, D = qg.shape
        G = self.group
        n_max = max((len(self.groups[s][h]) for s in slots for h in range(H)), default=0)
        part, chunks = None, []
        qi = qg.float()[..., self._perm]
        for c0 in range(0, n_max, self.chunk_groups):
            C = min(self.chunk_groups, n_max - c0)
            ids, cnt = self._chunk_ids(slots, c0, C)
            ix = ids.flatten().to(self.device)
            tok = {n: t.index_select(0, ix) for n, t in self.tok.items()}
            ck, cv = self.decode_features(tok, {n: t.index_select(0, ix) for n, t in self.grp.items()})
            k = self.rope.rotate_interleaved(self._keys(ck.view(B, H, C * G, -1)), tok["pos"].view(B, H, C * G))
            valid = (torch.arange(G).view(1, 1, 1, G) < cnt.unsqueeze(-1)).view(B, H, 1, C * G).to(self.device)
            scores = torch.matmul(qi, k.transpose(-1, -2)) * scale  # (B, H, R, C*G) float32
            scores = scores.masked_fill(~valid, float("-inf"))
            p = partial(scores, cv.view(B, H, C * G, -1))  # acc over features (B, H, R, r_v)
            part = p if part is None else _merge(part, p)
            chunks.append((scores, valid))
        if part is None:
            return None, chunks
        mu, up = self.fac["v_mu"], self.fac["v_up"]
        acc = part.acc if self._ident["v"] else (
            torch.matmul(part.acc, up.unsqueeze(0)) + part.l.unsqueeze(-1) * mu.view(1, H, 1, D))
        return Part(part.m, part.l, acc), chunks

    # ---- positions -----------------------------------------------------------------------------------
    def reposition(self, slot, new_pos, rotate) -> None:
        """Sealed keys are stored before RoPE: their positions change, nothing else. The tail's keys are
        after RoPE and are rotated."""
        self.tail.reposition(slot, new_pos, rotate)
        for h in range(self.n_kv):
            blocks = self.groups[slot][h]
            if not blocks:
                continue
            ix = torch.tensor(blocks, device=self.device)
            pos = self.tok["pos"][ix]  # (n, group)
            held = (torch.arange(self.group).view(1, -1) < torch.tensor(self.counts[slot][h]).view(-1, 1)).to(self.device)
            pos[held] = new_pos(pos[held]).to(pos.dtype)
            self.tok["pos"][ix] = pos


def _merge(a: Part, b: Part) -> Part:
    """Two partial softmaxes of the same queries -> one (unnormalized, like its inputs)."""
    m = torch.maximum(a.m, b.m)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(a.m - m_safe), torch.exp(b.m - m_safe)
    return Part(m, a.l * wa + b.l * wb, a.acc * wa.unsqueeze(-1) + b.acc * wb.unsqueeze(-1))


@dataclass
class CSKV(Method):
    name = "cskv"
    role = "format"
    k_density: float = 0.5
    v_density: float = 0.5
    window: int = 32
    sink: int = 4
    group: int = 16
    calib_samples: int = 32
    calib_tokens: int = 512
    calib_seed: int = 0
    train_steps: int = 40
    lr: float = 1e-3
    refine_samples: int = 2
    data: str | None = None
    bits: int = 0  # 0: features in the model's dtype; 2 or 4: packed KIVI codes (methods/cskv_quant.py)
    v_bits: int | None = None  # with bits: the value features' bits, 2 or 4 (default: bits)
    qgroup: int = 32  # with bits: value feature channels sharing a scale (capped at the value rank)

    def __post_init__(self):
        self._float("k_density", lo=0.0, hi=1.0, lo_open=True)
        self._float("v_density", lo=0.0, hi=1.0, lo_open=True)
        self._int("window", lo=0)
        self._int("sink", lo=0)
        self._int("group", lo=1)
        self._int("calib_samples", lo=1)
        self._int("calib_tokens", lo=16)
        self._int("calib_seed", lo=0)
        self._int("train_steps", lo=0)
        self._float("lr", lo=0.0, lo_open=True)
        self._int("refine_samples", lo=1)
        self._int("bits")
        if self.bits not in (0, 2, 4):
            raise self._err("bits", "must be 0 (no quantization), 2 or 4", self.bits)
        if self.v_bits is not None:
            self._int("v_bits")
            if not self.bits or self.v_bits not in (2, 4):
                raise self._err("v_bits", "must be 2 or 4, with bits 2 or 4", self.v_bits)
        self._int("qgroup", lo=1)
        if self.data is not None and not isinstance(self.data, str):
            raise self._err("data", "must be a file path", self.data)

    @classmethod
    def keep_all(cls) -> "CSKV":
        return cls(k_density=1.0, v_density=1.0)  # identity factors: lossless up to float rounding

    def ranks(self, head_dim: int) -> tuple[int, int]:
        return tuple(max(1, min(head_dim, round(d * head_dim))) for d in (self.k_density, self.v_density))

    # ---- calibration -------------------------------------------------------------------------------
    def _sample_params(self) -> dict:
        return {"samples": self.calib_samples, "tokens": self.calib_tokens, "seed": self.calib_seed,
                "data": data_key(self.data), "version": 1}

    def calib_params(self, head_dim: int) -> dict:
        rk, rv = self.ranks(head_dim)
        p = {**self._sample_params(), "k_rank": rk, "v_rank": rv, "train_steps": self.train_steps}
        if self.train_steps:
            p.update(lr=self.lr, refine_samples=self.refine_samples, window=self.window)
        return p

    def calibrate(self, probe, force: bool = False):
        """Factors of the probe's model for these ranks, computed once and cached; -> the cache file."""
        d = probe.desc
        params = self.calib_params(d.head_dim)
        path = cache_path(probe.model_name, "cskv", params, suffix=".safetensors")
        if not force and read_tensors(path) is not None:
            return path
        probe.progress(f"cskv: calibrating factors of {probe.model_name} once (cached in {path})")
        seqs = samples(probe.tokenizer, self.calib_samples, self.calib_tokens, self.calib_seed, self.data)
        mpath = cache_path(probe.model_name, "cskv-moments", self._sample_params(), suffix=".safetensors")
        got = None if force else read_tensors(mpath)
        mom = got[0] if got else None
        if mom is None:
            mom = moments(probe, seqs)
            write_tensors(mpath, mom, {"model": probe.model_name, "params": self._sample_params()})
        fac = pca_factors(mom, params["k_rank"], params["v_rank"])
        if self.train_steps and min(params["k_rank"], params["v_rank"]) < d.head_dim:
            fac = refine(probe, fac, seqs[: self.refine_samples], self.train_steps, self.lr, self.window,
                         queries=min(128, self.calib_tokens // 2))
        write_tensors(path, fac, {"model": probe.model_name, "params": params})
        return path

    def bind(self, desc, probe=None) -> None:
        super().bind(desc, probe)
        if probe is None:
            raise KvchatError("cskv needs the model's rotary embedding: bind it through an Engine")
        rk, rv = self.ranks(desc.head_dim)
        L, H, D = desc.n_layers, desc.n_kv_heads, desc.head_dim
        if rk == D and rv == D:
            eye = torch.eye(D).expand(L, H, D, D)
            fac = {n: eye.clone() if n[2:] in ("down", "up") else torch.zeros(L, H, D) for n in FACTORS}
        else:
            got = read_tensors(cache_path(desc.name, "cskv", self.calib_params(D), suffix=".safetensors"))
            fac = (got or read_tensors(self.calibrate(probe)))[0]
            want = {"k_down": (L, H, D, rk), "v_down": (L, H, D, rv)}
            if any(tuple(fac[n].shape) != s for n, s in want.items()):
                raise KvchatError(f"cskv factors for {desc.name} do not fit the model ({L} layers x {H} heads x "
                                  f"{D}); run `kvchat calibrate -p cskv` again")
        self.factors = {n: fac[n].to(desc.device, torch.float32) for n in FACTORS}
        self.rope = Rope(probe.rope_tables, desc.dtype, desc.device)

    # ---- format ------------------------------------------------------------------------------------
    def format_layers(self, desc) -> list[int]:
        return list(range(desc.n_layers))

    def make_format(self, layer, n_slots, block_size, desc, with_bias, pinned):
        fac = {n: t[layer] for n, t in self.factors.items()}
        kw = dict(factors=fac, rope=self.rope, group=self.group, residual=self.window, pinned=max(pinned, self.sink),
                  pos_dtype=pos_dtype(desc.max_positions))
        args = (n_slots, desc.n_kv_heads, desc.head_dim, block_size, desc.dtype, desc.device, with_bias)
        if not self.bits:
            return CSKVFormat(*args, **kw)
        from kvchat.methods.cskv_quant import QuantFeatureFormat

        rk, rv = self.ranks(desc.head_dim)
        kb, vb = self.bits, self.v_bits or self.bits
        qg = min(self.qgroup, rv)
        if (rk * kb) % 8 or (rv * vb) % 8 or rv % qg:
            raise ProfileError(f"cskv.bits {kb}/{vb}: ranks {rk} (keys) and {rv} (values) of {desc.name} must pack "
                               f"into whole bytes and the value rank must be a multiple of qgroup {qg}; pick densities "
                               f"that give ranks divisible by {max(8 // min(kb, vb), qg)}")
        return QuantFeatureFormat(*args, k_bits=kb, v_bits=vb, qgroup=qg, **kw)


def pos_dtype(max_positions: int) -> torch.dtype:
    """A sealed token's position: int16 when every position the model can reach fits (the engine refuses a
    prompt or a step at max_positions: SmolLM2's 8,192 do), int32 otherwise. 2 bytes a token of 256 in bf16."""
    return torch.int16 if max_positions <= 2**15 else torch.int32
