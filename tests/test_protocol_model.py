"""The cache protocol on the embedded SmolLM2: compositions that compact from two methods at once stay
consistent after every step, and the 16-bit format holds what its formula says."""

from __future__ import annotations

import pytest

from conftest import chat_ids
from test_protocol import check_consistent
from kvchat.engine import Engine, Request, SamplingParams
from kvchat.methods.d2o import D2O
from kvchat.methods.half import Half
from kvchat.methods.kivi import Kivi
from kvchat.methods.pyramid import PyramidInfer
from kvchat.methods.razor import RazorAttention
from kvchat.methods.tova import TOVA
from kvchat.methods.window import Window
from kvchat.profiles import Profile

pytestmark = [pytest.mark.model]

TEXT = ("The lighthouse keeper wrote in his log every evening. The storm came from the west and the "
        "boats stayed in the harbour. ") * 30


@pytest.mark.parametrize("methods", [
    lambda: [Window(sink=4, recent=96), D2O(ratio=0.25, min_budget=64)],
    lambda: [PyramidInfer(), RazorAttention(recent=64)],
    lambda: [RazorAttention(recent=64), D2O(ratio=0.25, min_budget=64), Half()],
    lambda: [TOVA(ratio=0.3, min_budget=64), Kivi(bits=4)],
    lambda: [RazorAttention(recent=64), TOVA(ratio=0.3, min_budget=64, heads="layer")],
], ids=["window+d2o", "pyramid+razor", "razor+d2o+half", "tova+kivi4", "razor+tova"])
def test_compositions_on_the_embedded_model(embedded, methods):
    eng = Engine(embedded, Profile("c", methods=methods()), max_slots=2)
    prompts = [chat_ids(embedded, TEXT + "Where did the storm come from?"),
               chat_ids(embedded, TEXT[: len(TEXT) // 2] + "Summarize the log.")]
    seqs = [eng.start(Request(str(i), ids, SamplingParams(max_new_tokens=1))) for i, ids in enumerate(prompts)]
    check_consistent(eng, [0, 1])
    toks = [s.out[-1] if s.out else 0 for s in seqs]
    for _ in range(48):  # greedy past any EOS: the point is the store, not the answer
        toks = eng.feed(seqs, toks).argmax(-1).tolist()
        check_consistent(eng, [0, 1])
    u = eng.usage(0)
    assert u.held < 0.6 * u.full


def test_half_on_the_embedded_model_keeps_the_answer(embedded):
    ids = chat_ids(embedded, "What is the capital of France?")
    full = Engine(embedded, Profile("full")).generate(ids, SamplingParams(max_new_tokens=12))
    half = Engine(embedded, Profile("half", methods=[Half(residual=0, group=16)]))
    res = half.generate(ids, SamplingParams(max_new_tokens=12))
    assert "Paris" in res.text and res.token_ids == full.token_ids
