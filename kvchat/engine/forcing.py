"""Teacher forcing: what a profile changes, measured by feeding the same tokens through two engines.

`Engine` inherits these; `kvchat.quality` uses them to score a compressed engine's answer against a
`full` engine's distributions over the same weights.
"""

from __future__ import annotations

import copy
import time

import torch

from kvchat.engine.seq import Request, Seq
from kvchat.errors import PromptTooLong


class Forcing:
    """Mixed into Engine: feeding given tokens instead of sampled ones (uses its prefill, feed, release)."""

    def force_start(self, ids: list[int]) -> tuple[Seq, torch.Tensor]:
        """Prefill `ids` into a free slot without sampling. -> (the sequence, logits for the next token);
        continue with `force`, end with `release`."""
        if not ids or len(ids) >= self.max_ctx:
            raise PromptTooLong(f"teacher forcing needs 1 to {self.max_ctx - 1:,} tokens, got {len(ids):,}")
        seq = Seq(req=Request("forced", list(ids)), slot=self.free_slots.pop(), t0=time.perf_counter())
        return seq, self.prefill(seq, ids)

    def force(self, seqs: list[Seq], tokens: list[int]) -> torch.Tensor:
        """One decode step that feeds `tokens` (one per sequence) instead of sampled ones; the methods run
        as in generation, so evictions during decode count. -> logits (B, vocab) for the next tokens."""
        if any(s.pos + 1 >= self.max_ctx for s in seqs):
            raise PromptTooLong(f"teacher forcing past the model's {self.max_ctx:,} positions")
        return self.feed(seqs, tokens)

    def score_continuation(self, prompt_ids: list[int], answer_ids: list[int]) -> torch.Tensor:
        """Logits (len(answer_ids), vocab): row i predicts answer_ids[i] from the prompt and the answer
        before it. One prefill in a fresh slot (prompt, then the answer as a second chunk), so it is
        meant for profiles that keep every token's hidden state (`full`, see `reference`)."""
        if len(prompt_ids) + len(answer_ids) > self.max_ctx:
            raise PromptTooLong(f"prompt + answer is {len(prompt_ids) + len(answer_ids):,} tokens; "
                                f"model max is {self.max_ctx:,}")
        seq, first = self.force_start(prompt_ids)
        try:
            rest = self.prefill(seq, answer_ids[:-1], all_logits=True) if len(answer_ids) > 1 else first[:0]
        finally:
            self.release(seq)
        return torch.cat([first.unsqueeze(0), rest])

    def reference(self) -> "Engine":
        """A one-slot `full` engine over this engine's weights (shared, not copied): the yardstick for
        teacher-forced comparisons beside a compressed engine costs a store, not a second model."""
        from kvchat.engine.generate import Engine  # the class this is mixed into
        from kvchat.profiles import load_profile

        runner = copy.copy(self.runner)  # same fused weights and modules, no methods, own counters
        runner.methods = []
        runner.stats = {k: 0 for k in self.runner.stats}
        return Engine(self.lm, load_profile("full"), max_slots=1, block_size=self.store.block_size, runner=runner)


