"""A conversation: messages, the chat template, and reuse of the compressed cache across turns.

A new user turn is prefilled on top of the slot's store (positions continue), never by re-running the
transcript: the text the template adds after what the store already holds is tokenized and fed alone.
The methods decide what of earlier turns survives.

At the model's position limit a conversation goes on: when the store holds few enough distinct
positions (a window), they are re-indexed to 0..n-1 with keys re-rotated (StreamingLLM's positions
within the cache); otherwise (`full`, or a method whose full layers or heads hold every token) the
oldest turns are dropped and the rest is read again, as llama.cpp's context shift does. Either way the
turn carries a notice saying so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvchat import templating
from kvchat.engine import Engine, PrefillInterrupted, Request, Result, SamplingParams
from kvchat.errors import PromptTooLong
from kvchat.profiles import Profile


@dataclass
class Turn:
    user: str
    result: Result
    prefill_tokens: int  # tokens fed to the model for this turn's prompt (the delta, not the transcript)
    reused: bool  # the store from earlier turns was kept
    notice: str | None = None  # what was done to stay within the model's positions, if anything
    context_ids: list[int] = field(default_factory=list)  # every token before the answer (for /compare)


@dataclass
class Session:
    lm: object
    profile: Profile
    params: SamplingParams = field(default_factory=SamplingParams)
    system: str | None = None
    truncate: str | None = None
    logprobs: int = 0  # record each answer's top-k log-probabilities (the REPL's /compare)
    messages: list[dict] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)

    def __post_init__(self):
        self.engine = Engine(self.lm, self.profile, max_slots=1)
        self._fed_text = ""  # rendered text of every token in the store, in order
        self._fed_ids: list[int] = []  # and the tokens themselves
        self._pos = 0

    # ---- conversation state ------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new conversation."""
        self._drop_store()
        self.messages, self.turns = [], []

    def switch(self, profile: Profile) -> None:
        """Go on under another profile: the transcript stays and is prefilled again at the next turn (the
        old profile's cache cannot serve the new one)."""
        self.profile = profile
        self.engine = Engine(self.lm, profile, max_slots=1)
        self._drop_store()
        self.turns = []

    def _drop_store(self) -> None:
        self.engine.clear(0)
        self._fed_text, self._fed_ids, self._pos = "", [], 0

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The whole transcript `messages` as prompt ids (what a fresh store would prefill)."""
        return templating.prompt_ids(self.lm.tokenizer, messages, self.system)

    # ---- a turn ------------------------------------------------------------------------------------
    def ask(self, text: str, on_token=None, should_stop=None, on_progress=None) -> Turn:
        """Answer `text` as the next user turn. `should_stop()` is polled between layers of the prefill and
        between decode steps; `on_progress(done, total)` follows the prefill. A stop during the prefill
        raises PrefillInterrupted and leaves the conversation as it was."""
        tok = self.lm.tokenizer
        messages = self.messages + [{"role": "user", "content": text}]
        full = templating.render(tok, messages, self.system)
        reused = bool(self._fed_text) and full.text.startswith(self._fed_text)
        if not reused:  # the template rewrote history (or first turn): start the store afresh
            self._drop_store()
        if not reused and self.truncate == "left":
            budget = templating.left_budget(self.lm.desc.max_positions, self.params.max_new_tokens)
            ids = templating.prompt_ids(tok, messages, self.system, budget=budget)
        else:
            ids = templating.encode(tok, full, start=len(self._fed_text))
        notice = None
        if reused and self._pos + len(ids) + self._answer_room() > self.lm.desc.max_positions:
            ids, messages, full, reused, notice = self._make_room(messages, full, ids)
        req = Request(str(len(self.turns)), ids, self.params, self.logprobs)
        try:
            seq = self.engine.start(req, on_token, slot=0, pos=self._pos, should_stop=should_stop,
                                    on_progress=on_progress)
        except PrefillInterrupted as e:
            if not e.whole:  # earlier chunks of this prompt are in the store: read the transcript again next time
                self._drop_store()
            raise
        context = self._fed_ids + seq.req.prompt_ids
        while not seq.finish:
            if should_stop is not None and should_stop():
                seq.finish = "interrupted"
                break
            self.engine.step([seq], on_token)
        fed = seq.out[: seq.n_fed]  # the last sampled token (or the EOS) is not in the store yet
        self._pos = seq.pos
        self._fed_text = full.text + tok.decode(fed, skip_special_tokens=False)
        self._fed_ids = context + fed
        result = self.engine.result(seq)
        self.messages = messages + [{"role": "assistant", "content": result.text}]
        turn = Turn(text, result, prefill_tokens=len(seq.req.prompt_ids), reused=reused, notice=notice,
                    context_ids=context)
        self.turns.append(turn)
        return turn

    # ---- the model's position limit ----------------------------------------------------------------
    def _answer_room(self) -> int:
        """Positions kept free for the answer when a turn starts."""
        return min(self.params.max_new_tokens, self.lm.desc.max_positions // 4)

    def _make_room(self, messages: list[dict], full, ids: list[int]):
        """The turn would pass the model's positions. -> (ids, messages, rendered, reused, notice)."""
        limit, room = self.lm.desc.max_positions, self._answer_room()
        held = self.engine.positions_held(0)
        if held + len(ids) + room <= limit:
            seen = self.engine.usage(0).seen
            self._pos = self.engine.reposition(0)
            return ids, messages, full, True, (
                f"[the cache holds {held:,} of the {seen:,} tokens seen: positions re-indexed to go on past "
                f"the model's {limit:,}]")
        first = 1 if messages and messages[0]["role"] == "system" else 0
        kept, dropped = list(messages), 0
        while True:
            ids = self.prompt_ids(kept)
            if len(ids) + room <= limit:
                break
            if len(kept) - first <= 1:
                raise PromptTooLong(f"this message is {len(ids):,} tokens with its framing; the model holds "
                                    f"{limit:,} positions less {room:,} for the answer (shorten it, or lower "
                                    "max_new_tokens with /set)")
            kept.pop(first)  # a user turn and the answers after it
            while len(kept) - first > 1 and kept[first]["role"] != "user":
                kept.pop(first)
            dropped += 1
        self._drop_store()
        self.messages = kept[:-1]
        return ids, kept, templating.render(self.lm.tokenizer, kept, self.system), False, (
            f"[context full: dropped the oldest {dropped} turn{'s' if dropped != 1 else ''} to stay within "
            f"the model's {limit:,} positions]")
