"""`kvchat eval`, fidelity, `batch --compare-full` and the REPL's /compare on the embedded SmolLM2."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kvchat.cli import main
from kvchat.engine import Engine
from kvchat.profiles import load_profile, parse_profile
from kvchat.quality import DEFAULT_TASKS, fidelity, make_cases, seeds
from kvchat.quality.evaluate import run_case

pytestmark = pytest.mark.model
PREFIX, SCORED = 384, 24


def tiny_window():
    return parse_profile({"name": "tiny-window", "methods": [{"window": {"sink": 4, "recent": 32}}]}, "test")


@pytest.fixture(scope="module")
def text(embedded):
    return fidelity.text_ids(embedded.tokenizer, None, PREFIX, SCORED)


@pytest.fixture(scope="module")
def ref(embedded, text):
    return fidelity.reference(Engine(embedded, load_profile("full")), text, PREFIX)


def test_full_against_itself_is_kl_zero_and_agreement_one(embedded, text, ref):
    got = fidelity.measure(Engine(embedded, load_profile("full")), text, PREFIX, ref)  # a second, separate run
    assert got["kl"] == 0.0 and got["top1"] == 1.0
    assert got["ppl"] == pytest.approx(ref.ppl, rel=1e-9) and 1 < got["ppl"] < 100


def test_a_tiny_window_loses_fidelity(embedded, text, ref):
    got = fidelity.measure(Engine(embedded, tiny_window()), text, PREFIX, ref)
    assert got["kl"] > 0.01 and got["top1"] < 1.0 and got["ppl"] > ref.ppl, got
    assert got["held_end"] < 0.2 < 1.0 <= ref.run["held_end"]


def test_fidelity_text_too_short_is_an_error(embedded, tmp_path):
    from kvchat.errors import KvchatError

    (tmp_path / "t.txt").write_text("only a few words")
    with pytest.raises(KvchatError, match=r"has \d+ tokens; fidelity needs 1,152"):
        fidelity.text_ids(embedded.tokenizer, str(tmp_path / "t.txt"), 1024, 128)


@pytest.mark.slow
def test_full_finds_at_least_90_percent_at_2k_tokens(embedded):
    """Tuning seeds 0-5 for each default task: 12 prompts of ~2,048 tokens, every filler."""
    eng = Engine(embedded, load_profile("full"))
    got = {t: [run_case(eng, c, 24) for c in make_cases(t, 2048, embedded.tokenizer, seeds("tuning", 6))]
           for t in DEFAULT_TASKS}
    right = {t: sum(c["correct"] for c in cs) for t, cs in got.items()}
    detail = {t: [(c["filler"], c["text"], c["expected"]) for c in cs if not c["correct"]] for t, cs in got.items()}
    assert sum(right.values()) >= 0.9 * 12, (right, detail)
    assert all(len(cs) == 6 and 1900 <= min(c["tokens"] for c in cs) for cs in got.values())


PROMPTS = ["What is the capital of France?", "Name three primary colors.", "What is 12 times 12?",
           "Write a haiku about the sea.", "Who wrote Hamlet?", "Explain what a CPU does in one sentence.",
           "List two uses of salt.", "What is the boiling point of water in Celsius?"]


def _batch(embedded, tmp_path, profile):
    from kvchat.batch import run_batch

    opts = {"model": "smollm2-135m-instruct", "profile": profile.name, "max_new_tokens": 24, "temperature": 0.0,
            "top_p": 1.0, "top_k": 0, "seed": None, "system": None, "device": "cpu", "dtype": "float32",
            "truncate": "error"}
    inp, out = tmp_path / "in.jsonl", tmp_path / f"{profile.name}.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    summary = run_batch(opts, str(inp), str(out), batch_size=8, loaded=(profile, embedded), compare_full=True)
    return [json.loads(l) for l in out.read_text().splitlines()], summary


def test_compare_full_on_eight_requests(embedded, tmp_path):
    rows, summary = _batch(embedded, tmp_path, load_profile("full"))
    assert len(rows) == 8
    for r in rows:
        q = r["quality"]
        assert q["kl_mean"] == 0.0 and q["top1_agreement"] == 1.0 and q["first_divergence"] is None, r
        assert q["tokens"] >= r["usage"]["completion_tokens"]  # a final EOS is compared too
    assert summary["quality"] == {"compared": 8, "kl_mean": 0.0, "top1_agreement": 1.0, "diverged": 0}
    # A cache far smaller than these prompts (~45-50 tokens) must show up in the same fields.
    small = parse_profile({"name": "w", "methods": [{"window": {"sink": 4, "recent": 8}}]}, "test")
    rows, summary = _batch(embedded, tmp_path, small)
    assert all(set(r["quality"]) == {"kl_mean", "top1_agreement", "first_divergence", "tokens"} for r in rows)
    assert summary["quality"]["kl_mean"] > 0.01 and summary["quality"]["diverged"] >= 1, summary


def test_repl_compare_scores_the_last_answer(embedded):
    from kvchat.commands import handle
    from kvchat.engine import SamplingParams
    from kvchat.quality.compare import TOPK
    from kvchat.session import Session

    s = Session(embedded, load_profile("full"), SamplingParams(max_new_tokens=12), logprobs=TOPK)
    assert "nothing to compare" in handle(s, "/compare").text
    s.ask("What is the capital of France?")
    s.ask("And of Italy?")  # the second turn's prompt sits on top of the first: the reference sees both
    text = handle(s, "/compare").text
    assert "KL 0.0000" in text and "agreement 100.0%" in text and "no divergence" in text, text


def test_eval_cli_on_two_profiles(embedded, tmp_path):
    out = tmp_path / "eval.json"
    r = CliRunner().invoke(main, ["eval", "-p", "full,window", "--lengths", "320", "--prefix-tokens", "384",
                                  "--scored-tokens", "16", "--json", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "| full " in r.output and "| window " in r.output and "(frontier)" in r.output
    rec = json.loads(out.read_text())
    full, win = rec["profiles"]
    assert (full["profile"], win["profile"]) == ("full", "window")
    assert full["kl"] == 0.0 and full["top1"] == 1.0 and win["kl"] > 0
    assert set(full["accuracy"]) == set(DEFAULT_TASKS) and len(full["cases"]) == 2
    assert rec["seeds"] == [1000] and all(c["seed"] == 1000 for c in full["cases"])
    assert win["held_end"] < 1.0 and full["held_prefill"] > 1.0  # window's 256 recent < 384 + 16


@pytest.mark.parametrize("args,msg", [
    (["-p", "full,nope"], "unknown profile 'nope'"),
    (["--lengths", "1k"], "--lengths '1k' is not a comma list"),
    (["--lengths", "100"], "--lengths 100 is too short"),
    (["--lengths", "9000"], "--lengths 9,000 is over the model's context: 8,192 positions"),
    (["--tasks", "passkey,sums"], "unknown task 'sums'"),
])
def test_eval_bad_input_is_one_line(embedded, args, msg):
    r = CliRunner().invoke(main, ["eval", "--no-progress", *args])
    assert r.exit_code == 1 and msg in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_eval_plot_without_matplotlib_is_one_line(embedded, monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    r = CliRunner().invoke(main, ["eval", "-p", "full", "--plot", str(tmp_path / "f.png")])
    assert r.exit_code == 1 and "kvchat[plot]" in r.output and len(r.output.strip().splitlines()) == 1


def test_eval_ctrl_c_keeps_what_finished(embedded, monkeypatch, tmp_path):
    from kvchat.quality import evaluate as ev

    real, calls = ev._profile, []

    def stop_on_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(ev, "_profile", stop_on_second)
    out = tmp_path / "partial.json"
    r = CliRunner().invoke(main, ["eval", "-p", "window,full", "--lengths", "300", "--tasks", "passkey",
                                  "--scored-tokens", "0", "--json", str(out), "--no-progress"])
    assert r.exit_code == 130, r.output
    assert "| window " in r.output and "| full " not in r.output and "interrupted" in r.output
    rec = json.loads(out.read_text())
    assert rec["interrupted"] and [p["profile"] for p in rec["profiles"]] == ["window"]
