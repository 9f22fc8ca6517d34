"""A conversation: messages, the chat template, and reuse of the compressed cache across turns.

A new user turn is prefilled on top of the slot's store (positions continue), never by re-running the
transcript: the text the template adds after what the store already holds is tokenized and fed alone.
The methods decide what of earlier turns survives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvchat.engine import Engine, Request, Result, SamplingParams
from kvchat.profiles import Profile


@dataclass
class Turn:
    user: str
    result: Result
    prefill_tokens: int  # tokens fed to the model for this turn's prompt (the delta, not the transcript)
    reused: bool  # the store from earlier turns was kept
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
        self.engine = Engine(self.lm, self.profile, max_slots=1, truncate=self.truncate)
        self._fed_text = ""  # rendered text of every token in the store, in order
        self._fed_ids: list[int] = []  # and the tokens themselves
        self._pos = 0

    # ---- conversation state ------------------------------------------------------------------------
    def reset(self, profile: Profile | None = None) -> None:
        """Start a new conversation (optionally under another profile)."""
        if profile is not None:
            self.profile = profile
            self.engine = Engine(self.lm, profile, max_slots=1, truncate=self.truncate)
        self._drop_store()
        self.messages, self.turns = [], []

    def _drop_store(self) -> None:
        self.engine.store.free_slot(0)
        self._fed_text, self._fed_ids, self._pos = "", [], 0

    def render(self, messages: list[dict], add_generation_prompt=True) -> str:
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + messages
        return self.lm.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        return self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ---- a turn ------------------------------------------------------------------------------------
    def ask(self, text: str, on_token=None, should_stop=None) -> Turn:
        """Answer `text` as the next user turn. `should_stop()` is polled between decode steps."""
        messages = self.messages + [{"role": "user", "content": text}]
        full = self.render(messages)
        reused = bool(self._fed_text) and full.startswith(self._fed_text)
        if not reused:  # the template rewrote history (or first turn): start the store afresh
            self._drop_store()
        delta = full[len(self._fed_text):]
        ids = self.encode(delta)
        seq = self.engine.start(Request(str(len(self.turns)), ids, self.params, self.logprobs), on_token, slot=0,
                                pos=self._pos)
        context = self._fed_ids + seq.req.prompt_ids
        while not seq.finish:
            if should_stop is not None and should_stop():
                seq.finish = "interrupted"
                break
            self.engine.step([seq], on_token)
        fed = seq.out[: seq.n_fed]  # the last sampled token (or the EOS) is not in the store yet
        self._pos = seq.pos
        self._fed_text = full + self.lm.tokenizer.decode(fed, skip_special_tokens=False)
        self._fed_ids = context + fed
        result = self.engine.result(seq)
        self.messages = messages + [{"role": "assistant", "content": result.text}]
        turn = Turn(text, result, prefill_tokens=len(seq.req.prompt_ids), reused=reused, context_ids=context)
        self.turns.append(turn)
        return turn
