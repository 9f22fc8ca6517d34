"""What a profile costs in quality: retrieval tasks from seeds, fidelity against `full`, comparisons.

The library API benchmarks and tests import:
    make_case(task, n_tokens, seed, tokenizer) -> Case      make_cases(task, n_tokens, tokenizer, seeds)
    score(case, text) -> bool                               seeds("tuning" | "heldout", n)
"""

from kvchat.quality.scoring import numbers, score
from kvchat.quality.sources import FILLERS
from kvchat.quality.tasks import (DEFAULT_TASKS, HELD_OUT_START, PHRASINGS, SPLITS, TASKS, TUNING, Case, chat_ids,
                                  make_case, make_cases, seeds)

__all__ = ["DEFAULT_TASKS", "FILLERS", "HELD_OUT_START", "PHRASINGS", "SPLITS", "TASKS", "TUNING", "Case",
           "chat_ids", "make_case", "make_cases", "numbers", "score", "seeds"]
