"""Batch files without a model: parsing and validation, sizes, seeds, whole-line writes, resume reading."""

from __future__ import annotations

import io
import json

import pytest
from click.testing import CliRunner

from kvchat.batch import Interrupts, OrderedWriter, summary_text
from kvchat.batch_io import derive_seed, parse_bytes, parse_line, parse_lines, read_done
from kvchat.cli import main


def err(text: str, line: int = 3) -> str:
    job = parse_line(text, line - 1, line)
    assert job.error is not None, text
    return job.error_record()["error"]["message"]


def test_native_lines_parse_with_options():
    j = parse_line('{"id": "a", "prompt": "hi", "max_new_tokens": 5, "temperature": 0.5, "top_p": 0.9, '
                   '"top_k": 3, "seed": 1, "stop": "END", "system": "Be brief."}', 0, 1)
    assert j.error is None and j.id == "a" and j.prompt == "hi" and not j.custom_id
    assert j.options == {"max_new_tokens": 5, "temperature": 0.5, "top_p": 0.9, "top_k": 3, "seed": 1,
                         "stop": ("END",), "system": "Be brief."}
    j = parse_line('{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}', 6, 7)
    assert j.error is None and j.id == 7 and j.messages == [{"role": "user", "content": "ab"}]


def test_openai_lines_keep_custom_id_and_map_options():
    j = parse_line(json.dumps({"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
                                        "max_tokens": 7, "temperature": 0}}), 0, 1)
    assert j.error is None and j.custom_id and j.id == "r1"
    assert j.options == {"max_new_tokens": 7, "temperature": 0}
    assert j.error_record("x") == {"id": "r1", "custom_id": "r1",
                                   "error": {"type": "invalid_request", "message": "line 1: x"}}


@pytest.mark.parametrize("text, message", [
    ("", "line 3: empty line"),
    ("   ", "line 3: empty line"),
    ('{"id": "a", "prompt": "x"', "line 3: invalid JSON"),
    ("[1, 2]", "line 3: expected a JSON object, got list"),
    ('{"id": "a", "messages": "hi"}', "line 3: 'messages' must be a list, got str"),
    ('{"id": "a", "messages": []}', "'messages' is empty"),
    ('{"id": "a", "messages": [{"role": "bot", "content": "x"}]}', "messages[0].role must be one of"),
    ('{"id": "a", "messages": [{"role": "user", "content": 3}]}', "messages[0].content must be a string"),
    ('{"id": "a", "prompt": 3}', "'prompt' must be a string, got int"),
    ('{"id": "a", "prompt": "x", "max_new_tokens": "ten"}', "'max_new_tokens' must be an integer >= 1, got \"ten\""),
    ('{"id": "a", "prompt": "x", "max_new_tokens": true}', "'max_new_tokens' must be an integer >= 1"),
    ('{"id": "a", "prompt": "x", "temperature": -1}', "'temperature' must be a number >= 0"),
    ('{"id": "a", "prompt": "x", "top_p": 0}', "'top_p' must be a number in (0, 1]"),
    ('{"id": "a", "prompt": "x", "stop": [1]}', "'stop' must be a string or a list of strings"),
    ('{"id": "a", "prompt": "x", "colour": "red"}', "unknown field 'colour'"),
    ('{"id": [1], "prompt": "x"}', "'id' must be a string or an integer"),
    ('{"id": "a"}', "give exactly one of 'prompt'"),
    ('{"id": "a", "prompt": "x", "messages": []}', "give exactly one of 'prompt'"),
    ('{"id": "a", "system": "s", "messages": [{"role": "system", "content": "t"}]}', "not both"),
    ('{"custom_id": "r", "body": {"messages": [], "tools": []}}', "unknown field body.'tools'"),
    ('{"custom_id": "r", "url": "/v1/embeddings", "body": {}}', "only /v1/chat/completions"),
    ('{"custom_id": "r", "body": {"messages": [{"role": "user", "content": "x"}], "n": 2}}', "body.n must be 1"),
])
def test_bad_lines_become_error_records_naming_the_line(text, message):
    assert message in err(text)


def test_error_ids_and_duplicates():
    jobs = parse_lines(['{"id": "a", "prompt": "x"}', "not json", '{"id": "a", "prompt": "y"}', '{"prompt": "z"}'])
    assert [j.id for j in jobs] == ["a", 2, "a", 4]
    assert [j.error is None for j in jobs] == [True, False, False, True]
    assert "duplicate id \"a\" (first on line 1)" in jobs[2].error


def test_parse_bytes():
    assert parse_bytes("1000000") == 1_000_000
    assert parse_bytes("500MB") == 500_000_000
    assert parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes("1.5 kib") == 1536
    for bad in ("2XB", "lots", "-1GB", "0"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_bad_max_kv_bytes_is_a_one_line_click_error(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n')
    r = CliRunner().invoke(main, ["batch", str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), "--max-kv-bytes", "2XB"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1] == (
        "Error: Invalid value for '--max-kv-bytes': '2XB' is not a size; use bytes or a number with a unit, "
        "e.g. 1000000, 500MB, 2GiB")
    r = CliRunner().invoke(main, ["batch", str(tmp_path / "in.jsonl"), "-", "--resume"])
    assert r.exit_code == 2 and "--resume needs OUT to be a file" in r.output
    r = CliRunner().invoke(main, ["batch", str(tmp_path / "nope.jsonl"), "-"])
    assert r.exit_code == 1 and "cannot read" in r.output and "nope.jsonl" in r.output


def test_derived_seeds_depend_on_run_seed_and_id_only():
    assert derive_seed(1, "a") == derive_seed(1, "a") != derive_seed(2, "a")
    assert derive_seed(1, "a") != derive_seed(1, "b") and derive_seed(1, 5) != derive_seed(1, "5")
    assert 0 <= derive_seed(7, "x") < 2**63


def test_writer_orders_and_writes_whole_lines():
    f = io.BytesIO()
    w = OrderedWriter(f, Interrupts())
    w.put(2, {"id": "c"})
    w.put(1, {"id": "b"})
    assert f.getvalue() == b""
    w.put(0, {"id": "a", "text": "é\u2028"})
    assert [json.loads(x)["id"] for x in f.getvalue().decode().split("\n")[:-1]] == ["a", "b", "c"]
    assert f.getvalue().endswith(b"\n") and w.written == 3


def test_read_done_truncates_a_partial_last_line(tmp_path):
    p = tmp_path / "out.jsonl"
    p.write_bytes(b'{"id": "a", "text": "x"}\n{"id": 2, "error": {}}\n{"id": "c", "te')
    assert read_done(str(p)) == {'"a"', "2"}
    assert p.read_bytes() == b'{"id": "a", "text": "x"}\n{"id": 2, "error": {}}\n'
    assert read_done(str(tmp_path / "missing.jsonl")) == set()
    p.write_bytes(b"garbage\n")
    with pytest.raises(ValueError, match="line 1 is not a kvchat result line"):
        read_done(str(p))


def test_summary_text_has_every_figure():
    s = {"prompts": 3, "ok": 2, "errors": 1, "skipped": 4, "interrupted": False, "prompt_tokens": 100,
         "completion_tokens": 20, "wall_s": 2.0, "tokens_per_s": 10.0, "max_concurrent": 2, "profile": "window",
         "kv": {"peak_bytes_held": 2_000_000, "peak_bytes_full": 4_000_000, "peak_saved": 0.5,
                "avg_bytes_held": 1_000_000, "avg_bytes_full": 4_000_000, "avg_saved": 0.75}}
    t = summary_text(s)
    for part in ("3 prompts", "2 ok", "1 errors", "4 skipped", "100 prompt", "20 generated", "10.0 tokens/s",
                 "up to 2", "peak 2.0 MB held vs 4.0 MB full (50% saved)", "average 1.0 MB vs 4.0 MB (75% saved)"):
        assert part in t, part


def test_resume_with_nothing_left_loads_no_model(tmp_path, monkeypatch):
    import kvchat.cli

    def no_model(opts):
        raise AssertionError("loaded the model")

    monkeypatch.setattr(kvchat.cli, "setup", no_model)
    (tmp_path / "in.jsonl").write_text('{"id": "a", "prompt": "hi"}\nnot json\n')
    (tmp_path / "out.jsonl").write_text('{"id": "a", "text": "hello"}\n{"id": 2, "error": {}}\n')
    r = CliRunner().invoke(main, ["batch", str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), "--resume",
                                  "--summary", str(tmp_path / "s.json")])
    assert r.exit_code == 0, r.output
    assert "0 prompts" in r.stderr and "2 skipped" in r.stderr
    assert json.loads((tmp_path / "s.json").read_text())["skipped"] == 2
    assert (tmp_path / "out.jsonl").read_text().count("\n") == 2
