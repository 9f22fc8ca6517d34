"""Scoring a generated answer against a case: the right number must be there, no distractor may be."""

from __future__ import annotations

import re

# A number as a model writes it: digits, maybe in groups of three after commas or thin spaces ("48,213").
_NUMBER = re.compile(r"\d{1,3}(?:[,\u202f\u2009]\d{3})+(?!\d)|\d+")


def numbers(text: str) -> list[str]:
    """The numbers in `text`, group separators removed, in order."""
    return [re.sub(r"[,\u202f\u2009]", "", m) for m in _NUMBER.findall(text)]


def score(case, text: str) -> bool:
    """True when `text` states the case's answer and none of its distractors (an earlier value of a
    reassigned label, another label's number). A number that merely contains the answer does not count."""
    found = set(numbers(text))
    return case.answer in found and not found.intersection(case.distractors)
