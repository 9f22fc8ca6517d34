"""Sampling and stopping: greedy, temperature, top-k, top-p, per-request seeds; EOS, stop strings, length."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(self.seed if self.seed is not None else int.from_bytes(os.urandom(7), "little"))
        return g


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    """logits (vocab,) float32 -> token id. Each request draws from its own generator, so its output does
    not depend on which other requests share the batch."""
    if p.temperature <= 0:
        return int(torch.argmax(logits))
    scaled = logits / p.temperature
    if not torch.isfinite(scaled.max()):  # a temperature so small the logits overflow: that is greedy
        return int(torch.argmax(logits))
    logits = scaled
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > p.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))
