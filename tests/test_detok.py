"""Incremental detokenization and stop strings: the same text as decoding the whole reply, at O(1)
decode work a token, with stop strings found when they are split over tokens."""

from __future__ import annotations

import pytest

from conftest import tiny_model
from kvchat.engine import Engine, Request, SamplingParams
from kvchat.engine.detok import Detokenizer, StopMatcher
from kvchat.profiles import Profile

MIXED = ("Naïve café owners in Zürich say 你好, Привет and γειά σου 🙂🚀 — then “quotes”, tabs\tand\n"
         "newlines, code `x = {'k': [1, 2]}` and numbers 3.14159 e^{iπ} + 1 = 0. ")


@pytest.mark.model
def test_incremental_text_equals_a_whole_decode_at_every_token(embedded):
    tok = embedded.tokenizer
    ids = tok(MIXED * 3, add_special_tokens=False)["input_ids"]
    ids = ids[:40] + [tok.eos_token_id] + ids[40:]  # a special token inside the reply is skipped as in decode
    d = Detokenizer(tok)
    for n, t in enumerate(ids, 1):
        assert d.add(t) == tok.decode(ids[:n], skip_special_tokens=True), n


@pytest.mark.model
def test_a_long_reply_costs_the_same_per_token_at_its_end_as_at_its_start(embedded):
    tok = embedded.tokenizer
    ids = (tok(MIXED * 40, add_special_tokens=False)["input_ids"])[:2000]
    d = Detokenizer(tok)
    work = []
    for t in ids:
        before = d.work
        d.add(t)
        work.append(d.work - before)
    first, last = sum(work[:200]), sum(work[-200:])
    assert last <= first * 1.5 and max(work) <= 40, (first, last, max(work))  # a whole decode would be ~2000x
    assert d.text == tok.decode(ids, skip_special_tokens=True)


def test_stop_matcher_finds_a_stop_split_over_pieces_and_scans_a_bounded_window():
    m = StopMatcher(["<END>", "STOP"])
    text, found = "", -1
    pieces = ["abc " * 50, "x<E", "N", "D> tail"]
    for p in pieces:
        text += p
        found = m.find(text, stable=len(text))
        if found >= 0:
            break
    assert found == text.index("<END>")
    assert m.scanned >= len("abc " * 50) - 5  # what was ruled out is not scanned again
    assert StopMatcher([]).find("anything", 8) == -1


def test_engine_stops_on_a_stop_string_that_spans_tokens():
    lm = tiny_model("llama")
    eng = Engine(lm, Profile("full"), max_slots=1)
    prompt = list(range(5, 25))
    free = eng.generate(prompt, SamplingParams(max_new_tokens=12))
    cut = len(free.text) // 2
    stop = free.text[cut - 3 : cut + 3]  # ToyTokenizer text " 12 7 301": 6 chars cross a token boundary
    assert " " in stop.strip() or stop.count(" ") >= 1
    got = Engine(lm, Profile("full"), max_slots=1).run([Request("a", prompt, SamplingParams(max_new_tokens=12,
                                                                                            stop=[stop]))])
    res = next(iter(got))
    assert res.finish_reason == "stop" and res.text == free.text[: free.text.index(stop)]
