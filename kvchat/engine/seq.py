"""What the engine's callers hand it and get back: requests, live sequences, results."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvchat.engine.sampling import SamplingParams


@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    logprobs: int = 0  # record the top-k log-probabilities of every sampled token's distribution (0: off)


@dataclass
class Logprobs:
    """What a run's distributions were, step by step, for teacher-forced comparisons: the top-k of each
    sampled token's log-softmax (temperature 1, before sampling). k x 12 bytes a step, so a batch of
    8 x 256 tokens at k = 256 records ~6 MB instead of the ~400 MB of whole fp32 distributions."""

    tokens: list[int]  # every sampled token, a final EOS included
    values: torch.Tensor  # (n, k) float32 log-probabilities, descending
    indices: torch.Tensor  # (n, k) int32 token ids


@dataclass
class Result:
    id: str
    text: str
    token_ids: list[int]
    finish_reason: str  # stop | length
    prompt_tokens: int
    kv: dict
    timing: dict
    logprobs: Logprobs | None = None  # when the request asked for them

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
    detok: object = None  # Detokenizer of `out` (set by Engine.start)
    stops: object = None  # StopMatcher over its text
    trace: list | None = None  # (token, top-k values, top-k indices) per sampled token, when recording


def logprobs_of(trace: list) -> Logprobs:
    return Logprobs([t for t, _, _ in trace], torch.stack([v for _, v, _ in trace]),
                    torch.stack([i for _, _, i in trace]))
