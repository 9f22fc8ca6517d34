"""The generation loop: prefill one sequence at a time, decode all live sequences together as slots.

A finished sequence frees its slot and the next waiting request takes it (continuous batching).
Positions are explicit per token: a sequence's next position is the number of tokens it has processed,
whatever its (compressed) cache holds.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from kvchat.cache import KVStore
from kvchat.cache.usage import Usage
from kvchat.engine.forward import Runner
from kvchat.engine.sampling import SamplingParams, find_stop, sample
from kvchat.errors import PromptTooLong
from kvchat.profiles import Profile, fresh


@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Result:
    id: str
    text: str
    token_ids: list[int]
    finish_reason: str  # stop | length
    prompt_tokens: int
    kv: dict
    timing: dict

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Seq:
    """A live sequence in a slot."""

    req: Request
    slot: int
    pos: int = 0  # next position
    out: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # chars of `text` already streamed
    last: int | None = None  # sampled, not yet fed
    n_fed: int = 0  # tokens of `out` already fed through the model (in the store)
    finish: str | None = None
    gen: torch.Generator | None = None
    t0: float = 0.0
    t_prefill: float = 0.0
    prefilled: int = 0


TokenCallback = Callable[[str, str], None]  # (request id, text delta)


class Engine:
    """Owns the model runner, the store and the methods of one profile."""

    def __init__(self, lm, profile: Profile, max_slots: int = 1, block_size: int = 16, prefill_chunk: int | None = None,
                 progress=None):
        self.lm, self.desc, self.tok = lm, lm.desc, lm.tokenizer
        self.profile = fresh(profile)
        self.methods = self.profile.methods
        for m in self.methods:
            m.bind(self.desc, lm, progress)
        aliases: dict[int, int] = {}
        for m in self.methods:
            aliases.update(m.aliases(self.desc))
        self.runner = Runner(lm, self.methods, max_slots=max_slots)
        self.store = KVStore(self.desc, max_slots, block_size, with_bias=any(m.needs_bias() for m in self.methods),
                             aliases=aliases)
        self.max_slots = max_slots
        self.prefill_chunk = prefill_chunk
        self.free_slots = list(range(max_slots - 1, -1, -1))
        self.max_ctx = self.desc.max_positions
        self.peak_live = 0

    # ---- one sequence ------------------------------------------------------------------------------
    def check_prompt(self, req: Request, past: int = 0) -> list[int]:
        """The ids to prefill after `past` tokens already in the slot; errors name the numbers. Cutting a
        long prompt is the caller's (kvchat.templating): only it knows the template's framing from the text."""
        n, limit = len(req.prompt_ids), self.max_ctx - past
        if n == 0:
            raise PromptTooLong("prompt is empty (0 tokens); give some text")
        if n < limit:
            return req.prompt_ids
        if past:
            raise PromptTooLong(f"conversation would reach {past + n:,} tokens; model max is {self.max_ctx:,} (use /reset)")
        raise PromptTooLong(f"prompt is {n:,} tokens; model max is {limit:,} (use --truncate left)")

    def prefill(self, seq: Seq, ids: list[int]) -> torch.Tensor:
        """Feed `ids` on top of the slot's store; -> logits for the next token."""
        t = time.perf_counter()
        chunk = self.prefill_chunk or len(ids)
        dev = self.desc.device
        for i in range(0, len(ids), chunk):
            part = ids[i : i + chunk]
            pos = torch.arange(seq.pos, seq.pos + len(part), device=dev)
            logits = self.runner.prefill(self.store, seq.slot, torch.tensor(part, device=dev), pos)
            seq.pos += len(part)
            self.store.seen[seq.slot] += len(part)
            for m in self.methods:
                m.after_prefill(self.store, seq.slot)
        self.store.note([seq.slot])
        self.store.trim()
        seq.prefilled += len(ids)
        seq.t_prefill += time.perf_counter() - t
        return logits

    def _accept(self, seq: Seq, logits: torch.Tensor, on_token: TokenCallback | None) -> None:
        p = seq.req.params
        tok = sample(logits, p, seq.gen)
        if tok in self.lm.eos_ids:
            seq.finish = "stop"
            self._emit(seq, on_token, final=True)
            return
        seq.out.append(tok)
        seq.text = self.tok.decode(seq.out, skip_special_tokens=True)
        cut = find_stop(seq.text, p.stop)
        if cut >= 0:
            seq.text, seq.finish = seq.text[:cut], "stop"
        elif len(seq.out) >= p.max_new_tokens or seq.pos + 1 >= self.max_ctx:
            seq.finish = "length"
        else:
            seq.last = tok
        self._emit(seq, on_token, final=seq.finish is not None)

    def _emit(self, seq: Seq, on_token, final: bool) -> None:
        if on_token is None:
            return
        end = len(seq.text)
        if not final:
            # Hold back what could be the start of a stop string, and half-decoded UTF-8.
            hold = max((len(s) - 1 for s in seq.req.params.stop), default=0)
            end = max(seq.emitted, end - hold)
            while end > seq.emitted and seq.text[end - 1] == "\ufffd":
                end -= 1
        if end > seq.emitted:
            on_token(seq.req.id, seq.text[seq.emitted : end])
            seq.emitted = end

    def start(self, req: Request, on_token: TokenCallback | None = None, slot: int | None = None, pos: int = 0) -> Seq:
        """Prefill `req` into a free slot, or on top of `slot`'s store at position `pos` (next turn)."""
        ids = self.check_prompt(req, past=pos)
        if slot is None:
            slot = self.free_slots.pop()
        seq = Seq(req=req, slot=slot, pos=pos, gen=req.params.generator(), t0=time.perf_counter())
        seq.req = Request(req.id, ids, req.params)
        self._accept(seq, self.prefill(seq, ids), on_token)
        return seq

    def step(self, seqs: list[Seq], on_token: TokenCallback | None = None) -> None:
        """One decode step for every live sequence in `seqs`."""
        dev = self.desc.device
        slots = torch.tensor([s.slot for s in seqs], device=dev)
        ids = torch.tensor([s.last for s in seqs], device=dev)
        pos = torch.tensor([s.pos for s in seqs], device=dev)
        logits = self.runner.decode(self.store, slots, ids, pos)
        for s in seqs:
            s.pos += 1
            s.n_fed += 1
            self.store.seen[s.slot] += 1
        for m in self.methods:
            m.after_decode(self.store, slots.tolist())
        self.store.note(slots.tolist())
        for i, s in enumerate(seqs):
            self._accept(s, logits[i], on_token)

    def usage(self, slot: int) -> Usage:
        """KV bytes of the sequence in `slot`: the one way callers read memory figures."""
        st = self.store
        return Usage(st.slot_held(slot), st.slot_full(slot), st.slot_peak_held[slot], st.slot_peak_full[slot],
                     st.seen[slot])

    def run_usage(self) -> tuple[Usage, Usage]:
        """(peak, average) over every update of this engine's store: all slots together."""
        st = self.store
        n = st.n_notes
        avg_h, avg_f = (round(st.sum_held / n), round(st.sum_full / n)) if n else (0, 0)
        return (Usage(st.peak_held, st.peak_full, st.peak_held, st.peak_full),
                Usage(avg_h, avg_f, st.peak_held, st.peak_full))

    def kept(self, slot: int) -> list[list[int]]:
        """Per layer, per KV head: tokens stored for `slot` (a layer sharing another's store reports it)."""
        return self.store.tokens_kept(slot)

    def result(self, seq: Seq) -> Result:
        wall = time.perf_counter() - seq.t0
        decode_s = max(wall - seq.t_prefill, 1e-9)
        n = len(seq.out)
        return Result(
            id=seq.req.id, text=seq.text, token_ids=list(seq.out), finish_reason=seq.finish or "length",
            prompt_tokens=len(seq.req.prompt_ids), kv=self.usage(seq.slot).record(self.profile.name),
            # Per sequence: its tokens over its own decode seconds, which it shares with the other
            # sequences decoding (and prefilling) beside it; a batch run's throughput is the summary's.
            timing={"prefill_s": round(seq.t_prefill, 4), "decode_s": round(decode_s, 4),
                    "decode_tokens_per_s": round(n / decode_s, 2) if n else 0.0},
        )

    def clear(self, slot: int) -> None:
        """Drop everything `slot` holds (a new conversation in a slot the caller keeps)."""
        self.store.free_slot(slot)

    def release(self, seq: Seq) -> None:
        self.store.free_slot(seq.slot)
        self.free_slots.append(seq.slot)

    # ---- many sequences ----------------------------------------------------------------------------
    def _fits(self, req: Request, cap: int | None) -> bool:
        """Would `req`'s prompt keep the bytes held under `cap`? Its size is estimated at the held/full
        ratio the live sequences show now, so a compressing profile admits more requests."""
        if cap is None:
            return True
        held, full = self.store.bytes_held(), self.store.bytes_full()
        ratio = held / full if full else 1.0
        return held + len(req.prompt_ids) * self.desc.kv_bytes_per_token * ratio <= cap

    def run(self, requests: Iterable[Request], on_token: TokenCallback | None = None,
            max_kv_bytes: int | None = None, on_error=None) -> Iterator[Result]:
        """Continuous batching: yields results as sequences finish (not in input order).

        A request that cannot start (prompt too long) goes to `on_error(request, exc)` if given."""
        waiting = deque(requests)
        live: list[Seq] = []
        while waiting or live:
            while waiting and self.free_slots and (not live or self._fits(waiting[0], max_kv_bytes)):
                req = waiting.popleft()
                try:
                    seq = self.start(req, on_token)
                except PromptTooLong as e:
                    if on_error is None:
                        raise
                    on_error(req, e)
                    continue
                live.append(seq)
            self.peak_live = max(self.peak_live, len(live))
            done = [s for s in live if s.finish]
            live = [s for s in live if not s.finish]
            if live:
                self.step(live, on_token)
                done += [s for s in live if s.finish]
                live = [s for s in live if not s.finish]
            for s in done:
                res = self.result(s)
                self.release(s)
                yield res

    def generate(self, prompt_ids: list[int], params: SamplingParams | None = None, on_token=None, rid="0") -> Result:
        """One prompt, start to finish, in a fresh slot."""
        return next(iter(self.run([Request(rid, prompt_ids, params or SamplingParams())], on_token)))
