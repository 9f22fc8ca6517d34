"""The REPL end to end through prompt-toolkit's pipe input on the embedded model, and its commands."""

from __future__ import annotations

import json
import re

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from kvchat.commands import handle
from kvchat.engine import Engine, SamplingParams
from kvchat.profiles import load_profile
from kvchat.repl import run_repl
from kvchat.session import Session

pytestmark = pytest.mark.model


def drive(session, lines: list[str], quiet=False) -> str:
    out: list[str] = []
    with create_pipe_input() as inp:
        inp.send_text("".join(line + "\n" for line in lines))
        run_repl(session, input=inp, output=DummyOutput(), write=out.append, quiet=quiet)
    return "".join(out)


@pytest.fixture
def small_window(tmp_path):
    p = tmp_path / "small-window.yaml"
    p.write_text("name: small-window\nmethods:\n  - window: {sink: 4, recent: 24}\n")
    return load_profile(str(p))


def test_two_turns_second_answer_depends_on_first_and_reuses_the_cache(embedded, kvchat_home):
    s = Session(embedded, load_profile("full"), SamplingParams(max_new_tokens=30))
    before = s.engine.runner.stats["prefill_tokens"]
    out = drive(s, ["The secret word is banana.", "What is the secret word?", "/exit"])
    assert len(s.turns) == 2 and "banana" in s.turns[1].result.text.lower()
    # The per-answer stats line: one rate, one unit; under full, block rounding shows as overhead.
    assert re.search(r"tok/s decode · KV [\d.]+ MiB held vs [\d.]+ MiB full \(\d+% overhead\)", out), out
    assert "What is the secret word?" in (kvchat_home / "history").read_text()  # input history persists
    second = s.turns[1]
    transcript = len(s.prompt_ids(s.messages[:-1]))
    # Only the new turn's tokens were prefilled, on top of the kept store.
    assert second.reused and second.prefill_tokens < 25 < transcript
    fed = s.engine.runner.stats["prefill_tokens"] - before
    assert fed == s.turns[0].prefill_tokens + second.prefill_tokens


def test_full_multi_turn_equals_each_transcript_from_scratch(embedded):
    s = Session(embedded, load_profile("full"), SamplingParams(max_new_tokens=24))
    scratch = Engine(embedded, load_profile("full"))
    for text in ["The secret word is banana.", "What is the secret word?", "Name a fruit that is yellow."]:
        turn = s.ask(text)
        ids = s.prompt_ids(s.messages[:-1])
        assert scratch.generate(ids, SamplingParams(max_new_tokens=24)).text == turn.result.text


def test_stats_under_window_shows_saved_bytes_and_layer_chart(embedded, small_window):
    s = Session(embedded, small_window, SamplingParams(max_new_tokens=30))
    out = drive(s, ["Tell me about the moon in a few sentences.", "/stats", "/exit"])
    m = re.search(r"conversation .*\((\d+)% saved\)", out)
    assert m and int(m.group(1)) > 0, out
    assert out.count("█") > 30 and "L29" in out
    assert s.engine.store.bytes_held() < s.engine.store.bytes_full()


def test_commands_undo_save_load_unknown_and_bad_set(embedded, tmp_path):
    s = Session(embedded, load_profile("full"), SamplingParams(max_new_tokens=8))
    path = tmp_path / "t.json"
    out = drive(s, ["Hello!", "Say one word.", "/undo", f"/save {path}", "/foo", "/set top_p 2",
                    "/set temperature hot", "/set max_new_tokens 5", "/exit"])
    assert "dropped the last exchange" in out
    assert "unknown command '/foo'; commands: /help" in out
    assert "/set top_p: 2 is out of range; accepted: in (0, 1]" in out
    assert "/set temperature: 'hot' is not a number" in out
    assert s.params.max_new_tokens == 5
    saved = json.loads(path.read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]
    assert saved["messages"][0]["content"] == "Hello!"
    t = Session(embedded, load_profile("full"), SamplingParams(max_new_tokens=8))
    assert "loaded 2 messages" in handle(t, f"/load {path}").text
    assert t.messages == saved["messages"]
    turn = t.ask("Thanks.")  # continues the loaded conversation: the transcript is prefilled first
    assert not turn.reused and turn.prefill_tokens > len(t.prompt_ids([{"role": "user", "content": "Thanks."}]))
    assert handle(t, f"/load {tmp_path / 'nope.json'}").text.startswith(f"/load: cannot read {tmp_path / 'nope.json'}: ")
    (tmp_path / "notes.txt").write_text("not json at all")
    assert "is not JSON (Expecting value at line 1)" in handle(t, f"/load {tmp_path / 'notes.txt'}").text
    assert len(t.messages) == 4  # neither failed /load touched the conversation


def test_retry_profile_and_system_commands(embedded, small_window):
    s = Session(embedded, load_profile("full"), SamplingParams(max_new_tokens=6))
    s.ask("Count to three.")
    first = s.messages[-1]["content"]
    reply = handle(s, "/retry")
    assert reply.ask == "Count to three." and s.messages == []
    assert s.ask(reply.ask).result.text == first  # greedy: the same answer again
    assert "profile small-window" in handle(s, f"/profile {small_window.source}").text and len(s.messages) == 2
    assert "unknown profile" in handle(s, "/profile nosuch").text
    handle(s, "/system You are terse.")
    assert s.system == "You are terse." and "You are terse." in embedded.tokenizer.decode(s.prompt_ids([{"role": "user", "content": "x"}]))
    assert "usage: /set KEY VALUE" in handle(s, "/set").text


def test_stopping_an_answer_keeps_the_conversation_usable(embedded):
    s = Session(embedded, load_profile("full"), SamplingParams(max_new_tokens=60))
    tokens = []  # should_stop is also asked between prefill layers: count streamed tokens, not calls

    turn = s.ask("Write a long poem about the sea.", on_token=lambda i, d: tokens.append(i),
                 should_stop=lambda: len(tokens) >= 5)
    assert turn.result.finish_reason == "interrupted" and 4 <= turn.result.completion_tokens <= 7
    nxt = s.ask("The secret word is banana. What is the secret word?")
    assert nxt.reused and "banana" in nxt.result.text.lower()
