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
    ('{"id": "a", "prompt": "x", "top_p": {}}', "'top_p' must be a number in (0, 1], got {}"),  # braces: no str.format
    ('{"id": "a", "prompt": "x", "temperature": NaN}', "'temperature' must be a number >= 0, got NaN"),
    ('{"id": "a", "prompt": "x", "seed": 18446744073709551616}', "'seed' must be an integer in [-2**63, 2**64)"),
    ('{"id": "a", "prompt": "x", "max_new_tokens": 1e999}', "'max_new_tokens' must be an integer >= 1, got Infinity"),
    ('{"id": "a", "prompt": ' + "1" * 5000 + "}", "invalid JSON (a number too long to read"),
    ("[" * 50_000, "invalid JSON (nested too deeply)"),
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


def test_read_done_reads_a_results_file_without_changing_it(tmp_path):
    p = tmp_path / "out.jsonl"
    data = b'{"id": "a", "text": "x"}\n{"id": 2, "error": {}}\n{"id": "c", "te'
    p.write_bytes(data)
    done = read_done(str(p))
    assert done.records == [('"a"', True), ("2", False)] and done.ids == {'"a"', "2"} and done.errors({"2"}) == 1
    assert (done.end, done.size) == (data.rindex(b"\n") + 1, len(data))  # the partial line is cut on append
    assert p.read_bytes() == data
    assert read_done(str(tmp_path / "missing.jsonl")).records == []
    for bad, why in [(b"garbage\n", "line 1 is not JSON"), (b'{"id": "q", "prompt": "x"}\n', "are IN and OUT swapped"),
                     (b'{"id": "a", "text": "x"}\nnotes', "line 2, no newline"), (b"\xff\xfe{}\n", "line 1 is not UTF-8")]:
        p.write_bytes(bad)
        with pytest.raises(ValueError, match=why):
            read_done(str(p))
        assert p.read_bytes() == bad


def test_summary_text_has_every_figure_in_one_unit_and_overhead_is_not_a_negative_saving():
    MiB = 2**20
    s = {"prompts": 3, "ok": 2, "errors": 1, "skipped": 4, "skipped_errors": 1, "interrupted": False,
         "prompt_tokens": 100, "completion_tokens": 20, "wall_s": 2.0, "tokens_per_s": 10.0, "max_concurrent": 2,
         "profile": "window",
         "kv": {"peak_bytes_held": 2 * MiB, "peak_bytes_full": 4 * MiB, "peak_saved": 0.5, "peak_overhead": 0.0,
                "avg_bytes_held": 4.4 * MiB, "avg_bytes_full": 4 * MiB, "avg_saved": 0.0, "avg_overhead": 0.1}}
    t = summary_text(s)
    for part in ("3 prompts", "2 ok", "1 errors", "4 skipped", "1 of them error records", "100 prompt", "20 generated",
                 "10.0 tokens/s over the run", "up to 2", "peak 2.0 MiB held vs 4.0 MiB full (50% saved)",
                 "average 4.4 MiB vs 4.0 MiB (10% overhead)"):
        assert part in t, part
    assert "-" not in t and " MB" not in t


def test_usage_reports_rounding_as_overhead_and_one_saved_formula():
    from kvchat.cache.usage import Usage
    from kvchat.stats import kv_line, turn_line

    over, under = Usage(1_200, 1_000, 1_200, 1_000), Usage(250, 1_000, 300, 1_000)
    assert (over.saved, over.overhead, under.saved, under.overhead) == (0.0, 0.2, 0.75, 0.0)
    assert kv_line(over.held, over.full, over.saved, over.overhead) == "KV 1.2 KiB held vs 1,000 B full (20% overhead)"
    rec = under.record("window")
    assert rec["saved"] == 0.75 and rec["overhead"] == 0.0

    class R:  # what the REPL prints after an answer: one named rate, one unit
        completion_tokens, timing, kv = 5, {"decode_tokens_per_s": 12.5}, over.record("full")

    assert turn_line(R) == "5 tok · 12.5 tok/s decode · KV 1.2 KiB held vs 1,000 B full (20% overhead)"


def test_resume_with_nothing_left_loads_no_model(tmp_path, monkeypatch):
    import kvchat.loading

    class Loaded(Exception):
        pass

    def setup(opts):  # batch imports kvchat.loading.setup when it needs the model
        raise Loaded

    monkeypatch.setattr(kvchat.loading, "setup", setup)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": "a", "prompt": "hi"}\nnot json\n')
    out.write_text('{"id": "a", "text": "hello", "finish_reason": "stop"}\n{"id": 2, "error": {}}\n')
    r = CliRunner().invoke(main, ["batch", str(inp), str(out), "--resume", "--summary", str(tmp_path / "s.json")])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert r.exit_code == 3, r.output  # nothing left to run; OUT holds one error record
    assert "0 prompts" in r.stderr and "2 skipped" in r.stderr and "1 of them error records" in r.stderr
    assert json.loads((tmp_path / "s.json").read_text())["skipped"] == 2
    assert out.read_text().count("\n") == 2
    # The patch is the one batch uses: with a line left to run, it loads.
    out.write_text('{"id": 2, "error": {}}\n')
    r = CliRunner().invoke(main, ["batch", str(inp), str(out), "--resume"])
    assert isinstance(r.exception, Loaded)
