"""The retrieval task generators and scorers (kvchat/quality): determinism per seed, every filler and
phrasing produced, lengths honoured, facts placed, answers checked (right one found, distractors rejected)."""

from __future__ import annotations

import re

import pytest

from kvchat.quality import FILLERS, PHRASINGS, TASKS, Case, make_case, make_cases, numbers, score, seeds
from kvchat.quality.sources import units
from kvchat.quality.tasks import PASSKEY


@pytest.fixture(scope="module")
def tok(embedded):
    return embedded.tokenizer


pytestmark = pytest.mark.model  # the embedded model's tokenizer


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_case_other_seed_other_case(tok, task):
    a, b = make_case(task, 700, 11, tok), make_case(task, 700, 11, tok)
    assert a == b
    c = make_case(task, 700, 12, tok)
    assert (c.content, c.answer) != (a.content, a.answer)


@pytest.mark.parametrize("task", TASKS)
def test_every_filler_and_phrasing_within_twelve_seeds(tok, task):
    cases = make_cases(task, 600, tok, seeds("tuning", 12))
    assert {c.filler for c in cases} == set(FILLERS)
    assert {c.phrasing for c in cases} == set(range(PHRASINGS[task]))
    assert {(c.filler, c.phrasing) for c in cases} == {(f, p) for f in FILLERS for p in range(PHRASINGS[task])}


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("n", [400, 1500])
def test_prompt_fits_the_length_and_holds_the_facts(tok, task, n):
    for seed in (1000, 1001, 1002, 1003):
        c = make_case(task, n, seed, tok)
        assert n - 80 <= len(c.prompt_ids) <= n, (seed, len(c.prompt_ids))
        # Each value appears only where its fact states it (never in the filler), so is each distractor.
        times = PASSKEY[c.phrasing][0].count("{v}") if task == "passkey" else 1
        for v in (c.answer, *c.distractors):
            assert len(re.findall(rf"(?<!\d){v}(?!\d)", c.content)) == times, (seed, v)
        # The question comes last, after the context.
        question = c.content.rsplit("\n\n", 1)[1]
        assert "?" in question or question.startswith(("Tell", "Which"))


def test_reassign_facts_come_in_order_and_the_last_is_the_answer(tok):
    for seed in range(8):
        c = make_case("reassign", 900, seed, tok)
        order = [c.content.index(v) for v in (*c.distractors, c.answer)]
        assert order == sorted(order), seed
        assert list(c.depths) == sorted(c.depths)


def test_passkey_depths_spread_over_consecutive_seeds(tok):
    depths = sorted(make_case("passkey", 500, s, tok).depths[0] for s in seeds("heldout", 10))
    assert depths[0] < 0.2 and depths[-1] > 0.8
    assert max(b - a for a, b in zip(depths, depths[1:])) < 0.25


def test_seed_ranges_do_not_overlap():
    assert seeds("tuning", 3) == [0, 1, 2]
    assert seeds("heldout", 2) == [1000, 1001]
    assert not set(seeds("tuning", 1000)) & set(seeds("heldout", 1000))
    with pytest.raises(ValueError, match="tuning range has 1000"):
        seeds("tuning", 1001)


def test_fillers_are_python_text_not_ours():
    import random

    got = {k: " ".join(units(k, random.Random(0), 400)) for k in FILLERS}
    assert "Python" in got["sentences"] or "better" in got["sentences"]  # the Zen of Python
    assert re.search(r"\d+: [a-z]", got["lists"])  # "8364: euro sign"
    assert re.search(r"\b(def|return|import|self|if)\b", got["code"])
    assert len(got["prose"].split(". ")) > 2


def _case(answer, distractors=()):
    return Case("multikey", 0, 0, "prose", 0, (0.5,), "", [], answer, tuple(distractors))


@pytest.mark.parametrize("text,ok", [
    ("48213", True),
    ("The code for the red door is 48213.", True),
    ("48,213", True),
    ("It is 48213, not 55555.", False),  # a distractor named too
    ("55555", False),
    ("482130", False),  # contains the answer's digits but is another number
    ("4821", False),
    ("I don't know.", False),
    ("The code is 48213. The blue door's code is 11111.", True),  # another number that is no distractor
])
def test_scorer(text, ok):
    assert score(_case("48213", ["55555", "66666"]), text) is ok


def test_numbers_reads_grouped_and_separate_numbers():
    assert numbers("48,213 and 12345; 1,2,3") == ["48213", "12345", "1", "2", "3"]
