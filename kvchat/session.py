"""A conversation: messages, the chat template, and reuse of the compressed cache across turns.

A new user turn is prefilled on top of the slot's store (positions continue), never by re-running the
transcript: the text the template adds after what the store already holds is tokenized and fed alone.
The methods decide what of earlier turns survives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvchat import templating
from kvchat.engine import Engine, Request, Result, SamplingParams
from kvchat.profiles import Profile


@dataclass
class Turn:
    user: str
    result: Result
    prefill_tokens: int  # tokens fed to the model for this turn's prompt (the delta, not the transcript)
    reused: bool  # the store from earlier turns was kept


@dataclass
class Session:
    lm: object
    profile: Profile
    params: SamplingParams = field(default_factory=SamplingParams)
    system: str | None = None
    truncate: str | None = None
    messages: list[dict] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)

    def __post_init__(self):
        self.engine = Engine(self.lm, self.profile, max_slots=1)
        self._fed_text = ""  # rendered text of every token in the store, in order
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
        self._fed_text, self._pos = "", 0

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The whole transcript `messages` as prompt ids (what a fresh store would prefill)."""
        return templating.prompt_ids(self.lm.tokenizer, messages, self.system)

    # ---- a turn ------------------------------------------------------------------------------------
    def ask(self, text: str, on_token=None, should_stop=None) -> Turn:
        """Answer `text` as the next user turn. `should_stop()` is polled between decode steps."""
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
        seq = self.engine.start(Request(str(len(self.turns)), ids, self.params), on_token, slot=0, pos=self._pos)
        while not seq.finish:
            if should_stop is not None and should_stop():
                seq.finish = "interrupted"
                break
            self.engine.step([seq], on_token)
        fed = seq.out[: seq.n_fed]  # the last sampled token (or the EOS) is not in the store yet
        self._pos = seq.pos
        self._fed_text = full.text + tok.decode(fed, skip_special_tokens=False)
        result = self.engine.result(seq)
        self.messages = messages + [{"role": "assistant", "content": result.text}]
        turn = Turn(text, result, prefill_tokens=len(seq.req.prompt_ids), reused=reused)
        self.turns.append(turn)
        return turn
