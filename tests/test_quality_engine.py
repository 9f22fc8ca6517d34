"""The engine's teacher-forcing pieces on tiny random models: forced steps equal sampled ones, the full
cache scores a continuation in one prefill, recorded log-probabilities, the shared-weight reference."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from kvchat.engine import Engine, Request, SamplingParams
from kvchat.errors import PromptTooLong
from kvchat.profiles import Profile, parse_profile
from kvchat.quality.compare import metrics


def window(recent=8):
    return parse_profile({"name": "tiny-window", "methods": [{"window": {"sink": 2, "recent": recent}}]}, "test")


def greedy_with_logits(lm, profile, prompt, n):
    """Generate n tokens greedily, keeping every step's logits: the sampled run forcing must reproduce."""
    eng = Engine(lm, profile, block_size=8)
    seq = eng.start(Request("g", prompt, SamplingParams(max_new_tokens=n), logprobs=lm.desc.vocab))
    while not seq.finish:
        eng.step([seq])
    res = eng.result(seq)
    return res, res.logprobs


@pytest.mark.parametrize("profile", [Profile("full"), window()], ids=["full", "window"])
def test_forced_steps_reproduce_the_sampled_run(profile):
    lm = tiny_model("llama")
    prompt = list(range(3, 40))
    res, rec = greedy_with_logits(lm, profile, prompt, 12)
    eng = Engine(lm, profile, block_size=8)
    seq, logits = eng.force_start(prompt)
    got = [torch.log_softmax(logits, -1)]
    for t in res.token_ids[:-1]:
        got.append(torch.log_softmax(eng.force([seq], [t])[0], -1))
    eng.release(seq)
    got = torch.stack(got)  # (n, vocab)
    # Recorded values are each step's whole log-softmax, sorted: forcing the same tokens gives the same rows.
    assert torch.equal(got.gather(1, rec.indices.long()), rec.values)
    assert eng.free_slots == [0]


def test_recorded_logprobs_follow_the_sampled_tokens():
    lm = tiny_model("qwen2")
    eng = Engine(lm, Profile("full"), block_size=8)
    res = eng.generate(list(range(5, 30)), SamplingParams(max_new_tokens=9), rid="r")
    assert res.logprobs is None  # only when asked
    res = next(eng.run([Request("r", list(range(5, 30)), SamplingParams(max_new_tokens=9), logprobs=16)]))
    rec = res.logprobs
    assert rec.values.shape == rec.indices.shape == (9, 16) and rec.tokens == res.token_ids
    assert rec.indices[:, 0].tolist() == res.token_ids  # greedy: the sampled token ranks first
    assert bool((rec.values[:, :-1] >= rec.values[:, 1:]).all())
    assert float(rec.values.exp().sum(1).max()) <= 1.0 + 1e-5


def test_full_scores_a_continuation_in_one_prefill_like_decode():
    lm = tiny_model("mistral")
    prompt = list(range(7, 50))
    res, rec = greedy_with_logits(lm, Profile("full"), prompt, 10)
    eng = Engine(lm, Profile("full"), block_size=8)
    logits = eng.score_continuation(prompt, rec.tokens)
    assert logits.shape == (10, lm.desc.vocab)
    lp = torch.log_softmax(logits, -1).gather(1, rec.indices.long())
    assert (lp - rec.values).abs().max() < 1e-4
    q = metrics(logits, rec)
    assert q["kl_mean"] < 1e-6 and q["top1_agreement"] == 1.0 and q["first_divergence"] is None
    assert eng.free_slots == [0]


def test_a_small_window_diverges_from_full():
    lm = tiny_model("llama")
    prompt = list(range(3, 120))
    res, rec = greedy_with_logits(lm, window(recent=4), prompt, 16)
    full = Engine(lm, Profile("full"), block_size=8)
    q = metrics(full.score_continuation(prompt, rec.tokens), rec)
    assert q["kl_mean"] > 1e-3, q


def test_coarse_kl_with_every_token_is_the_exact_kl():
    torch.manual_seed(0)
    full, run = torch.randn(5, 40) * 3, torch.randn(5, 40) * 3
    lp_run = torch.log_softmax(run, -1)
    top = lp_run.topk(40)

    class Rec:
        tokens, values, indices = [0] * 5, top.values, top.indices

    exact = (torch.softmax(full, -1) * (torch.log_softmax(full, -1) - lp_run)).sum(-1).mean()
    assert metrics(full, Rec)["kl_mean"] == pytest.approx(float(exact), abs=1e-6)

    class Top8(Rec):
        values, indices = top.values[:, :8], top.indices[:, :8]

    assert 0 < metrics(full, Top8)["kl_mean"] <= float(exact) + 1e-6  # merging outcomes only lowers a KL


def test_reference_shares_the_weights_and_keeps_the_engine_untouched():
    lm = tiny_model("llama")
    eng = Engine(lm, window(), max_slots=3, block_size=8)
    ref = eng.reference()
    assert ref.runner.layers is eng.runner.layers and ref.runner.methods == [] and eng.runner.methods
    assert ref.profile.name == "full" and ref.max_slots == 1
    prompt = list(range(3, 60))
    solo = Engine(lm, Profile("full"), block_size=8).generate(prompt, SamplingParams(max_new_tokens=8)).token_ids
    assert ref.generate(prompt, SamplingParams(max_new_tokens=8)).token_ids == solo


def test_per_position_logits_refuse_a_profile_that_drops_hidden_states():
    lm = tiny_model("llama")
    pyr = parse_profile({"name": "p", "methods": [{"pyramidinfer": {"min_context": 4, "recent_ratio": 0.1,
                                                                     "decay": 0.5, "sink": 1}}]}, "test")
    eng = Engine(lm, pyr, block_size=8)
    with pytest.raises(ValueError, match="dropped"):
        eng.score_continuation(list(range(3, 200)), list(range(5, 40)))


def test_forcing_past_the_context_is_an_error():
    lm = tiny_model("llama")
    eng = Engine(lm, Profile("full"), block_size=8)
    with pytest.raises(PromptTooLong):
        eng.force_start(list(range(lm.desc.max_positions)))
    with pytest.raises(PromptTooLong, match="prompt \\+ answer"):
        eng.score_continuation(list(range(400)), list(range(200)))
