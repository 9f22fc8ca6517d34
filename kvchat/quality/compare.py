"""One answer scored by the full cache: `batch --compare-full` and the REPL's `/compare`.

The compressed run records the top-k log-probabilities of every step (`Request.logprobs = TOPK`); after
it, the prompt and the answer go through `full` in one extra prefill that returns the logits at every
answer position (`Engine.score_continuation`). Per answer:
    kl_mean           KL(full || run) in nats per answer token, over k + 1 outcomes: the run's top-k
                      tokens and "any other token". Merging outcomes can only lower a KL, so this is a
                      lower bound of the exact KL; it is 0 exactly when the two agree.
    top1_agreement    share of answer positions where both caches rank the same token first
    first_divergence  the first answer position (0-based token index) where they do not; null if none
"""

from __future__ import annotations

import torch

TOPK = 256  # 3 KB a step: at 8 x 256 tokens the recording costs ~6 MB


def metrics(ref_logits: torch.Tensor, rec) -> dict:
    """ref_logits (n, vocab) from `full`; rec a `Logprobs` of the same n steps. -> the quality fields."""
    lpf = torch.log_softmax(ref_logits.double(), dim=-1)
    idx = rec.indices.long()
    lp_run = rec.values.double()  # (n, k)
    lpf_k = lpf.gather(1, idx)
    pf_k = lpf_k.exp()
    rest_f = (1 - pf_k.sum(1)).clamp_min(0)  # full's mass outside the run's top k
    rest_r = (1 - lp_run.exp().sum(1)).clamp_min(1e-12)
    kl = (pf_k * (lpf_k - lp_run)).sum(1) + torch.xlogy(rest_f, rest_f) - torch.xlogy(rest_f, rest_r)
    kl = kl.clamp_min(0)  # float rounding when the two are equal
    agree = lpf.argmax(1) == idx[:, 0]
    miss = (~agree).nonzero()
    return {"kl_mean": round(kl.mean().item(), 6), "top1_agreement": round(agree.double().mean().item(), 4),
            "first_divergence": int(miss[0, 0]) if len(miss) else None, "tokens": len(rec.tokens),
            "_full_top1": lpf.argmax(1).tolist()}


def compare_answer(ref_engine, prompt_ids: list[int], rec) -> dict:
    """Score a recorded answer with `ref_engine` (a `full` engine, see `Engine.reference`)."""
    logits = ref_engine.score_continuation(list(prompt_ids), rec.tokens)
    return metrics(logits, rec)


def public(q: dict) -> dict:
    """The fields a batch line carries (without the per-token detail the REPL prints)."""
    return {k: v for k, v in q.items() if not k.startswith("_")}


def describe(q: dict, tokenizer, rec) -> str:
    """The REPL's one-line answer to /compare."""
    n = q["tokens"]
    line = (f"vs full, teacher-forced over {n} answer token{'s' if n != 1 else ''}: KL {q['kl_mean']:.4f} nats/token, "
            f"top-1 agreement {q['top1_agreement']:.1%}")
    i = q["first_divergence"]
    if i is None:
        return line + ", no divergence"
    ran, full = int(rec.indices[i, 0]), q["_full_top1"][i]
    return (line + f", first divergence at token {i}: this cache's top token {tokenizer.decode([ran])!r}, "
            f"full's {tokenizer.decode([full])!r}")


class Averages:
    """The batch summary's quality figures: means over the compared answers."""

    def __init__(self):
        self.n = self.diverged = 0
        self.kl = self.agree = 0.0

    def add(self, q: dict) -> None:
        self.n += 1
        self.kl += q["kl_mean"]
        self.agree += q["top1_agreement"]
        self.diverged += q["first_divergence"] is not None

    def summary(self) -> dict:
        n = max(self.n, 1)
        return {"compared": self.n, "kl_mean": round(self.kl / n, 6), "top1_agreement": round(self.agree / n, 4),
                "diverged": self.diverged}
