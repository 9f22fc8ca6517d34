"""Long conversations: a long prefill shows progress and can be stopped, and a chat goes on past the
model's positions (re-indexed under a window, oldest turns dropped under full). The model's limit is
lowered to 1,024 positions so the tests run in seconds; the mechanism is the one used at 8,192."""

from __future__ import annotations

import dataclasses

import pytest

from kvchat.engine import PrefillInterrupted, SamplingParams
from kvchat.profiles import load_profile
from kvchat.session import Session
from kvchat.stats import prefill_progress

pytestmark = [pytest.mark.model]

FILLER = "The committee met on Tuesday and discussed the budget for the new library wing. " * 20  # ~300 tokens


def doc_turns(n: int) -> list[str]:
    """n turns of ~340 tokens of real text (Python's docs) with a question: a chat the 135M model follows
    (repeated filler makes it parrot the filler instead)."""
    from kvchat.calibration.data import read_text

    txt = read_text(None)
    return [txt[20000 + i * 1400 : 20000 + (i + 1) * 1400] + "\n\nWhat is this text about?" for i in range(n)]


def small(lm, positions=1024):
    return dataclasses.replace(lm, desc=dataclasses.replace(lm.desc, max_positions=positions))


def chat(session, texts):
    return [session.ask(t) for t in texts]


@pytest.mark.parametrize("profile, notice", [("window", "positions re-indexed"), ("full", "dropped the oldest")])
def test_a_chat_goes_on_past_the_models_positions(embedded, profile, notice):
    s = Session(small(embedded), load_profile(profile), SamplingParams(max_new_tokens=12))
    turns = chat(s, doc_turns(3) + ["The secret word is banana."])
    last = s.ask("What is the secret word?")
    notices = [t.notice for t in turns + [last] if t.notice]
    assert notices and notice in notices[0], notices
    assert sum(t.prefill_tokens + t.result.completion_tokens for t in turns + [last]) > 1024  # past the limit
    assert s._pos < 1024 and "banana" in last.result.text.lower(), last.result.text
    if profile == "full":
        assert len(s.messages) < 2 * 5  # old turns are gone from the transcript too


def test_a_long_prefill_reports_progress_and_stops_cleanly(embedded):
    s = Session(embedded, load_profile("window"), SamplingParams(max_new_tokens=8))
    s.ask("The secret word is banana.")
    held = lambda: [[s.engine.store.read(l, 0, h).pos.tolist() for h in range(3)]  # noqa: E731
                    for l in s.engine.store.owned_layers()]
    before = (list(s.messages), s._pos, s._fed_text, held(), s.engine.store.seen[0])
    shown, calls = [], {"n": 0}

    def stop_soon():
        calls["n"] += 1
        return calls["n"] > 4  # a few layers in

    with pytest.raises(PrefillInterrupted):
        s.ask(FILLER * 3 + "Summarize.", should_stop=stop_soon, on_progress=prefill_progress(shown.append, 100))
    assert any("reading" in x and "Ctrl-C" in x for x in shown)
    # the same tokens in every layer and head (the block table may stay wider: that is capacity, not data)
    assert (list(s.messages), s._pos, s._fed_text, held(), s.engine.store.seen[0]) == before
    nxt = s.ask("What is the secret word?")
    assert nxt.reused and "banana" in nxt.result.text.lower()
