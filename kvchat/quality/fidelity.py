"""Fidelity against `full` on a real text: teacher-forced next-token KL, top-1 agreement, perplexity.

The text's first `prefix` tokens are prefilled under the profile; the next `scored` tokens are fed one at
a time through the engine's decode step (the text's token, not a sampled one), so what the methods evict
or merge during decode counts. `full` goes through the very same procedure as the reference, so `full`
against itself is KL 0 and agreement 1 exactly. KL is KL(full || profile) in nats per token, the mean
over the scored tokens; agreement is the share of them where both caches rank the same token first.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kvchat.errors import KvchatError

DEFAULT_TEXT = "pydoc_data.topics"  # Python's own language reference: shipped, not written by us


@dataclass
class Reference:
    """`full`'s log-probabilities over the scored tokens: (S, vocab) float32 and the text's tokens."""

    logp: torch.Tensor
    targets: torch.Tensor  # (S,) the scored tokens
    run: dict  # full's own figures (held shares, timing)

    @property
    def ppl(self) -> float:
        return math.exp(-self.logp.gather(1, self.targets.view(-1, 1)).double().mean().item())


def text_ids(tokenizer, path: str | None, prefix: int, scored: int) -> list[int]:
    """The first prefix + scored tokens of the text (`path`, or Python's documentation)."""
    need = prefix + scored
    if path is None:
        from kvchat.quality.sources import doc_text

        text, name = doc_text(), DEFAULT_TEXT
    else:
        try:
            text, name = Path(path).expanduser().read_text(encoding="utf-8", errors="replace"), path
        except OSError as e:
            raise KvchatError(f"--text {path}: cannot read it ({e.strerror})") from None
    ids = tokenizer(text[: need * 12])["input_ids"]  # no token is longer than 12 characters on average
    if len(ids) < need:
        ids = tokenizer(text)["input_ids"]
    if len(ids) < need:
        raise KvchatError(f"--text {name} has {len(ids):,} tokens; fidelity needs {need:,} (--prefix-tokens "
                          f"{prefix:,} + --scored-tokens {scored:,}): give a longer text or lower them")
    return ids[:need]


def forced_run(engine, ids: list[int], prefix: int, on_logits) -> dict:
    """Prefill ids[:prefix], then force ids[prefix:-1] one decode step at a time; `on_logits(i, logits)`
    gets the logits (vocab,) predicting ids[prefix + i]. -> held shares, prefill s, decode tokens/s."""
    seq, logits = engine.force_start(ids[:prefix])
    try:
        after = engine.usage(seq.slot)
        on_logits(0, logits)
        t = time.perf_counter()
        for i in range(1, len(ids) - prefix):
            on_logits(i, engine.force([seq], [ids[prefix + i - 1]])[0])
        decode_s = time.perf_counter() - t
        end = engine.usage(seq.slot)
    finally:
        engine.release(seq)
    steps = len(ids) - prefix - 1
    return {"held_prefill": round(after.held / after.full, 4), "held_end": round(end.held / end.full, 4),
            "prefill_s": round(seq.t_prefill, 3), "decode_tok_s": round(steps / decode_s, 2) if steps else 0.0}


def reference(engine, ids: list[int], prefix: int) -> Reference:
    """Run `full` (engine must be a full-profile engine) and keep its log-probabilities."""
    S = len(ids) - prefix
    logp = torch.empty(S, engine.desc.vocab)

    def keep(i, logits):
        logp[i] = torch.log_softmax(logits.float(), dim=-1)

    run = forced_run(engine, ids, prefix, keep)
    return Reference(logp, torch.tensor(ids[prefix:]), run)


def measure(engine, ids: list[int], prefix: int, ref: Reference) -> dict:
    """The profile's KL, agreement and perplexity against `ref` on the same text, plus its run figures."""
    kl = torch.zeros(len(ids) - prefix, dtype=torch.float64)
    agree = torch.zeros_like(kl)
    nll = torch.zeros_like(kl)

    def compare(i, logits):
        lp = torch.log_softmax(logits.float(), dim=-1)
        r = ref.logp[i]
        kl[i] = max(0.0, float((r.exp() * (r - lp)).sum()))  # float rounding must not make it negative
        agree[i] = float(lp.argmax() == r.argmax())
        nll[i] = -float(lp[ref.targets[i]])

    run = forced_run(engine, ids, prefix, compare)
    return {"kl": kl.mean().item(), "top1": agree.mean().item(), "ppl": math.exp(nll.mean().item()), **run}


def of_reference(ref: Reference) -> dict:
    """`full`'s own row: it is the reference, so KL 0 and agreement 1 by construction."""
    return {"kl": 0.0, "top1": 1.0, "ppl": ref.ppl, **ref.run}
