"""The generation loop: prefill one sequence at a time, decode all live sequences together as slots.

A finished sequence frees its slot and the next waiting request takes it (continuous batching).
Positions are explicit per token: a sequence's next position is the number of tokens it has processed,
whatever its (compressed) cache holds.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Iterable, Iterator

import torch

from kvchat.cache import KVStore
from kvchat.cache.usage import Usage
from kvchat.engine.forward import PrefillStopped, Runner
from kvchat.engine.layout import build_formats, resolve_aliases
from kvchat.engine.probe import Probe
from kvchat.engine.forcing import Forcing
from kvchat.engine.detok import Detokenizer, StopMatcher
from kvchat.engine import threads
from kvchat.engine.sampling import SamplingParams, sample
from kvchat.engine.seq import Request, Result, Seq, logprobs_of
from kvchat.errors import PromptTooLong
from kvchat.profiles import Profile, fresh


TokenCallback = Callable[[str, str], None]  # (request id, text delta)


class PrefillInterrupted(Exception):
    """`should_stop` stopped a prefill. `whole`: the store is exactly as before it (the stop came in the
    prompt's only or first chunk); otherwise earlier chunks of the prompt are in it, already compressed."""

    def __init__(self, whole: bool):
        super().__init__("prefill stopped")
        self.whole = whole


class Engine(Forcing):
    """Owns the model runner, the store and the methods of one profile."""

    def __init__(self, lm, profile: Profile, max_slots: int = 1, block_size: int = 16, prefill_chunk: int | None = None,
                 progress=None, runner: Runner | None = None):
        self.lm, self.desc, self.tok = lm, lm.desc, lm.tokenizer
        self.profile = fresh(profile)
        self.methods = self.profile.methods
        self.runner = runner or Runner(lm, self.methods, max_slots=max_slots)
        self.probe = Probe(self.runner, lm, progress)
        for m in self.methods:
            m.bind(self.desc, self.probe)
        aliases = resolve_aliases(self.methods, self.desc)
        with_bias = any(m.needs_bias() for m in self.methods)
        pinned = max((m.pinned() for m in self.methods), default=0)
        formats = build_formats(self.methods, self.desc, max_slots, block_size, with_bias, pinned, aliases)
        self.store = KVStore(self.desc, max_slots, block_size, with_bias=with_bias, aliases=aliases,
                             formats=formats, listeners=self.methods)
        self.max_slots = max_slots
        self.prefill_chunk = prefill_chunk
        self.free_slots = list(range(max_slots - 1, -1, -1))
        self.max_ctx = self.desc.max_positions
        self.peak_live = 0
        self.threads = threads.shared() if self.desc.device.type == "cpu" else None  # None: fixed threads

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

    def prefill(self, seq: Seq, ids: list[int], should_stop=None, on_progress=None,
                all_logits: bool = False) -> torch.Tensor:
        """Feed `ids` on top of the slot's store; -> logits for the next token, or with `all_logits`
        (len(ids), vocab) logits predicting each token after each of `ids` (teacher forcing).

        `on_progress(done, total)` is told the prompt tokens' progress (layer by layer, so a long
        single-chunk prompt still moves); `should_stop()` is asked between layers: True rolls the
        current chunk back out of every layer and raises PrefillInterrupted."""
        t = time.perf_counter()
        chunk = self.prefill_chunk or len(ids)
        dev = self.desc.device
        L = self.desc.n_layers
        parts = []
        for i in range(0, len(ids), chunk):
            part = ids[i : i + chunk]
            if self.threads is not None:
                self.threads.before_step()

            def between_layers(layer: int, i=i, n=len(part)) -> bool:
                if on_progress is not None:
                    on_progress(i + n * (layer + 1) // L, len(ids))
                return should_stop is not None and bool(should_stop())

            pos = torch.arange(seq.pos, seq.pos + len(part), device=dev)
            hook = between_layers if (should_stop or on_progress) else None
            try:
                logits = self.runner.prefill(self.store, seq.slot, torch.tensor(part, device=dev), pos,
                                             out="logits" if all_logits else "last", should_stop=hook)
            except PrefillStopped as stop:
                self._roll_back(seq.slot, stop.layer)
                raise PrefillInterrupted(whole=i == 0) from None
            if all_logits:
                if logits.shape[0] != len(part):
                    raise ValueError(f"a method dropped {len(part) - logits.shape[0]} of {len(part)} tokens' "
                                     "hidden states: per-position logits need a profile that keeps them (full)")
                parts.append(logits)
            seq.pos += len(part)
            self.store.seen[seq.slot] += len(part)
            for m in self.methods:
                m.after_prefill(self.store, seq.slot)
            self.store.seal([seq.slot])
        self.store.note([seq.slot])
        self.store.trim()
        seq.prefilled += len(ids)
        seq.t_prefill += time.perf_counter() - t
        return torch.cat(parts) if all_logits else logits

    def positions_held(self, slot: int) -> int:
        """How many distinct positions the tokens `slot` holds span (what `reposition` re-indexes to)."""
        return int(self._held_positions(slot).numel())

    def _held_positions(self, slot: int) -> torch.Tensor:
        st = self.store
        return torch.unique(torch.cat([st.read(l, slot, h).pos.long() for l in st.owned_layers()
                                       for h in range(self.desc.n_kv_heads)]))  # sorted

    def reposition(self, slot: int) -> int:
        """Re-index the tokens `slot` holds to consecutive positions 0..n-1 (in order; the same token keeps
        the same position in every layer and head), keys re-rotated. -> the next free position, n.

        A compressing profile holds far fewer tokens than it has seen: this lets a conversation go on past
        the model's max positions (StreamingLLM's positions within the cache)."""
        st = self.store
        held = self._held_positions(slot)
        rank = lambda old: torch.searchsorted(held, old.long())  # noqa: E731
        for l in st.owned_layers():
            st.format(l).reposition(slot, rank, self.runner.rotate)
        return int(held.numel())

    def _roll_back(self, slot: int, last_layer: int) -> None:
        """Take a stopped chunk out of the layers that stored it (every method's state follows)."""
        for layer in range(last_layer + 1):
            if self.store.owns(layer):
                start = self.store.chunk_start[layer]
                self.store.compact(layer, slot, [torch.arange(n) for n in start])
        self.store.stats = {}
        self.store.trim()  # give back the blocks the chunk took

    def _accept(self, seq: Seq, logits: torch.Tensor, on_token: TokenCallback | None, tok: int | None = None) -> None:
        """Take `seq`'s next token (`tok`, or sampled from `logits`), then stop or go on."""
        p = seq.req.params
        tok = sample(logits, p, seq.gen) if tok is None else tok
        if seq.trace is not None:
            top = torch.log_softmax(logits.float(), dim=-1).topk(min(seq.req.logprobs, logits.shape[-1]))
            seq.trace.append((tok, top.values, top.indices.to(torch.int32)))
        if tok in self.lm.eos_ids:
            seq.finish = "stop"
            self._emit(seq, on_token, final=True)
            return
        seq.out.append(tok)
        if seq.detok is None:
            seq.detok, seq.stops = Detokenizer(self.tok), StopMatcher(p.stop)
        seq.text = seq.detok.add(tok)
        cut = seq.stops.find(seq.text, stable=len(seq.detok.committed))
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

    def start(self, req: Request, on_token: TokenCallback | None = None, slot: int | None = None, pos: int = 0,
              should_stop=None, on_progress=None) -> Seq:
        """Prefill `req` into a free slot, or on top of `slot`'s store at position `pos` (next turn).
        `should_stop` / `on_progress`: see `prefill` (a stopped prefill gives a fresh slot back)."""
        ids = self.check_prompt(req, past=pos)
        fresh_slot = slot is None
        if fresh_slot:
            slot = self.free_slots.pop()
        seq = Seq(req=req, slot=slot, pos=pos, gen=req.params.generator(), t0=time.perf_counter(),
                  trace=[] if req.logprobs > 0 else None)
        seq.req = Request(req.id, ids, req.params, req.logprobs)
        try:
            logits = self.prefill(seq, ids, should_stop, on_progress)
        except PrefillInterrupted:
            if fresh_slot:
                self.release(seq)
            raise
        self._accept(seq, logits, on_token)
        return seq

    def feed(self, seqs: list[Seq], tokens: list[int]) -> torch.Tensor:
        """One decode step feeding `tokens[i]` to `seqs[i]` (sampled, or forced for teacher-forced
        scoring); the methods and formats run as in generation. -> logits (B, vocab)."""
        dev = self.desc.device
        if self.threads is not None:
            self.threads.before_step()
        slots = [s.slot for s in seqs]
        slots_t = torch.tensor(slots, device=dev)
        ids = torch.tensor(tokens, device=dev)
        pos = torch.tensor([s.pos for s in seqs], device=dev)
        logits = self.runner.decode(self.store, slots, slots_t, ids, pos)
        for s in seqs:
            s.pos += 1
            s.n_fed += 1
            self.store.seen[s.slot] += 1
        for m in self.methods:
            m.after_decode(self.store, slots)
        self.store.seal(slots)
        self.store.note(slots)
        return logits

    def step(self, seqs: list[Seq], on_token: TokenCallback | None = None) -> None:
        """One decode step for every live sequence in `seqs`."""
        logits = self.feed(seqs, [s.last for s in seqs])
        # Every greedy sequence's token from one argmax over the batch (per row: the same first maximum).
        greedy = [s.req.params.temperature <= 0 for s in seqs]
        best = torch.argmax(logits, -1).tolist() if any(greedy) else None
        for i, s in enumerate(seqs):
            self._accept(s, logits[i], on_token, best[i] if greedy[i] else None)

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

    @property
    def aliases(self) -> dict[int, int]:
        """{layer: earlier layer whose KV cache it reads} (a layout's share map; empty without one)."""
        return dict(self.store.aliases)

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
            logprobs=logprobs_of(seq.trace) if seq.trace else None,
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
