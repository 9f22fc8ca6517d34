"""`kvchat batch` end to end on the embedded SmolLM2: mixed files, batch-size invariance, stdin/stdout,
kill and resume, and the --max-kv-bytes admission of full vs a compressed profile."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvchat.batch import run_batch
from kvchat.cli import main
from kvchat.profiles import load_profile

pytestmark = pytest.mark.model

OPTS = {"model": "smollm2-135m-instruct", "profile": "full", "max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0,
        "top_k": 0, "seed": None, "system": None, "device": "cpu", "dtype": "float32", "truncate": "error"}


def lines(path: Path) -> list[dict]:
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    return [json.loads(x) for x in raw.decode().split("\n")[:-1]]


def write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def batch(embedded, tmp_path, rows, profile="full", **kw):
    opts = {**OPTS, **kw.pop("opts", {}), "profile": profile}
    inp, out = write(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    summary = run_batch(opts, str(inp), str(out), loaded=(load_profile(profile), embedded), **kw)
    return lines(out), summary


MIXED = [
    {"id": "france", "prompt": "What is the capital of France?"},
    {"id": "m", "messages": [{"role": "system", "content": "Answer in one word."},
                             {"role": "user", "content": "What is the capital of France?"}]},
    {"custom_id": "oa-1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "What is the capital of France?"}],
              "max_tokens": 8}},
    "",
    '{"id": "broken", "prompt": "x"',
    {"id": "notlist", "messages": "What is the capital of France?"},
    {"id": "wrongtype", "prompt": "Hi", "max_new_tokens": "8"},
    {"id": "long", "prompt": "hello " * 9000},
    {"prompt": "What is the capital of France?", "max_new_tokens": 3},
]


def test_mixed_file_gives_one_line_per_input_line_in_order(embedded, tmp_path):
    out, summary = batch(embedded, tmp_path, MIXED, batch_size=3, summary_path=str(tmp_path / "s.json"))
    assert [r["id"] for r in out] == ["france", "m", "oa-1", 4, 5, "notlist", "wrongtype", "long", 9]
    ok = {r["id"]: r for r in out if "text" in r}
    errors = {r["id"]: r["error"] for r in out if "error" in r}
    assert set(ok) == {"france", "m", "oa-1", 9}
    for rid in ("france", "m", "oa-1"):
        assert "Paris" in ok[rid]["text"], ok[rid]
    assert ok["oa-1"]["custom_id"] == "oa-1" and "custom_id" not in ok["france"]
    assert ok[9]["usage"]["completion_tokens"] == 3 and ok[9]["finish_reason"] == "length"
    r = ok["france"]
    assert list(r) == ["id", "text", "finish_reason", "usage", "kv", "timing"]
    assert r["usage"]["prompt_tokens"] > 10 and r["finish_reason"] in ("stop", "length")
    assert set(r["kv"]) == {"profile", "bytes_held", "bytes_full", "saved", "overhead", "peak_bytes_held", "peak_bytes_full"}
    assert r["kv"]["saved"] == 0.0 and r["kv"]["overhead"] > 0  # full: block rounding, not a negative saving
    assert set(r["timing"]) == {"prefill_s", "decode_s", "decode_tokens_per_s"}
    assert all(e["type"] == "invalid_request" for e in errors.values())
    assert errors[4]["message"].startswith("line 4: empty line")
    assert errors[5]["message"].startswith("line 5: invalid JSON")
    assert errors["notlist"]["message"] == "line 6: 'messages' must be a list, got str"
    assert errors["wrongtype"]["message"].startswith("line 7: 'max_new_tokens' must be an integer")
    assert errors["long"]["message"].startswith("line 8: prompt is ") and "model max is 8,192" in errors["long"]["message"]
    assert summary["ok"] == 4 and summary["errors"] == 5 and summary["prompts"] == 9 and summary["exit_code"] == 3
    assert json.loads((tmp_path / "s.json").read_text()) == summary
    assert summary["completion_tokens"] == sum(r["usage"]["completion_tokens"] for r in ok.values())


@pytest.mark.slow
def test_results_do_not_depend_on_batch_size(embedded, tmp_path):
    """Greedy lines equal token for token; sampled lines too, through seeds derived from --seed and the id."""
    questions = ["What is the capital of France?", "Name a fruit.", "What is 3 + 4?", "Say hello.",
                 "Name a planet.", "What color is the sky?"]
    rows = [{"id": f"g{i}", "prompt": q, "max_new_tokens": 4 + i % 3} for i, q in enumerate(questions)]
    rows += [{"id": "s1", "prompt": "Tell me a story.", "temperature": 0.9},
             {"id": "s2", "prompt": "Tell me a story.", "temperature": 0.9, "seed": 3}]
    runs = {}
    for bs in (1, 8):
        out, summary = batch(embedded, tmp_path, rows, batch_size=bs, opts={"seed": 11, "max_new_tokens": 5})
        assert summary["max_concurrent"] == min(bs, len(rows))
        runs[bs] = [(r["id"], r["text"], r["usage"], r["finish_reason"]) for r in out]
    assert runs[1] == runs[8]


def test_stdin_to_stdout_pipeline(embedded):
    rows = [json.dumps({"id": "a", "prompt": "What is the capital of France?"}), '{"id": "b", "prompt": 1}']
    r = CliRunner().invoke(main, ["batch", "-", "-", "--max-new-tokens", "8", "--progress", "--device", "cpu",
                                  "--dtype", "float32"],  # bf16 ties the first token (test_embedded)
                           input="\n".join(rows) + "\n")
    assert r.exit_code == 3, r.output  # one line is an error record
    out = [json.loads(x) for x in r.stdout.strip().split("\n")]
    assert [o["id"] for o in out] == ["a", "b"] and "Paris" in out[0]["text"] and "error" in out[1]
    assert "batch: 2 prompts, 1 ok, 1 errors" in r.stderr and "KV (full)" in r.stderr
    assert "2/2" in r.stderr and re.search(r"tok/s, KV \d+% (saved|overhead)", r.stderr)  # the progress bar


def test_max_kv_bytes_admits_more_requests_when_compressed(embedded, tmp_path):
    """Under one cap, the window profile (holding ~48 tokens a sequence) decodes more sequences at once
    than full (holding every prompt token)."""
    small = tmp_path / "small-window.yaml"
    small.write_text("name: small-window\nsummary: test\nmethods:\n  - window: {sink: 4, recent: 32}\n")
    text = "The sky is blue and the grass is green. " * 14  # ~180 tokens a prompt with the template: ~8 MB full
    rows = [{"id": i, "prompt": f"{i}. {text} What colour is the sky?", "max_new_tokens": 3} for i in range(5)]
    seen = {}
    for profile in ("full", str(small)):
        _, s = batch(embedded, tmp_path, rows, profile=profile, batch_size=5, max_kv_bytes="15MB")
        assert s["ok"] == 5 and s["max_kv_bytes"] == 15_000_000
        seen[profile] = s
    full, window = seen["full"], seen[str(small)]
    assert full["max_concurrent"] <= 2 < window["max_concurrent"], (full["max_concurrent"], window["max_concurrent"])
    assert window["kv"]["peak_saved"] > 0.5 and window["kv"]["avg_saved"] > 0.3


# ---- interrupted runs ----------------------------------------------------------------------------------
def _spawn(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "kvchat.cli", "batch", *args], env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _wait_for_lines(proc, out: Path, n: int, timeout=240.0) -> None:
    t = time.time()
    while time.time() - t < timeout and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"no {n} lines in {out} after {timeout:.0f}s: {proc.poll()} {proc.stderr.read().decode()[-2000:] if proc.poll() is not None else ''}")


def _resume_and_check(inp: Path, out: Path, ids) -> None:
    r = CliRunner().invoke(main, ["batch", str(inp), str(out), "--resume", "--max-new-tokens", "12",
                                  "--batch-size", "2", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    raw = out.read_bytes()
    assert raw.endswith(b"\n")
    got = [json.loads(x)["id"] for x in raw.decode().split("\n")[:-1]]
    assert sorted(got) == sorted(ids) and len(got) == len(set(got))
    assert "skipped: already in OUT" in r.stderr


QUESTIONS = ["What is the capital of France?", "Name a fruit.", "What is 3 + 4?", "Say hello.", "Name a planet.",
             "What color is the sky?", "Count to three.", "Name an animal.", "What is water made of?", "Say bye."]


@pytest.mark.slow
def test_sigkill_then_resume_yields_every_id_once(models_dir, tmp_path):
    ids = [f"k{i}" for i in range(len(QUESTIONS))]
    inp = write(tmp_path / "in.jsonl", [{"id": i, "prompt": q} for i, q in zip(ids, QUESTIONS)])
    out = tmp_path / "out.jsonl"
    proc = _spawn([str(inp), str(out), "--max-new-tokens", "12", "--batch-size", "2", "--device", "cpu"])
    _wait_for_lines(proc, out, 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    assert out.read_bytes().count(b"\n") < len(ids)
    with open(out, "ab") as f:  # what a write cut short would leave behind
        f.write(b'{"id": "k9", "text": "Bye')
    _resume_and_check(inp, out, ids)


@pytest.mark.slow
def test_sigint_keeps_whole_lines_exits_130_then_resume(models_dir, tmp_path):
    ids = [f"i{i}" for i in range(len(QUESTIONS))]
    inp = write(tmp_path / "in.jsonl", [{"id": i, "prompt": q} for i, q in zip(ids, QUESTIONS)])
    out = tmp_path / "out.jsonl"
    proc = _spawn([str(inp), str(out), "--max-new-tokens", "12", "--batch-size", "2", "--device", "cpu"])
    _wait_for_lines(proc, out, 1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted;" in err and "run again with --resume" in err
    assert out.read_bytes().endswith(b"\n")
    _resume_and_check(inp, out, ids)
