"""`kvchat batch --ray`: the same lines as the local run, kill and resume, calibrations shipped (not
recomputed) to the workers, and its one-line errors. The end-to-end runs start a local Ray instance with
2 workers on the embedded model (about 20 s of start-up each)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvchat.batch import run_batch
from kvchat.calibration import cache
from kvchat.cli import main
from kvchat.profiles import load_profile

OPTS = {"model": "smollm2-135m-instruct", "profile": "razor", "max_new_tokens": 6, "temperature": 0.0, "top_p": 1.0,
        "top_k": 0, "seed": None, "system": None, "device": "cpu", "dtype": "float32", "truncate": "error"}
QUESTIONS = ["What is the capital of France?", "Name a fruit.", "What is 3 + 4?", "Say hello.", "Name a planet.",
             "What color is the sky?", "Count to three.", "Name an animal.", "What is water made of?", "Say bye."]
BAD = ["", '{"id": "broken", "prompt": "x"', json.dumps({"id": "wrongtype", "prompt": "Hi", "max_new_tokens": "8"}),
       json.dumps({"id": "long", "prompt": "hello " * 9000}), json.dumps({"id": "nolist", "messages": "Hi"}),
       json.dumps([1, 2]), json.dumps({"id": "q3", "prompt": "a duplicate id"}), "\ufeff{}"]


def mixed_rows(n: int = 40) -> list[str]:
    """`n` lines: good ones (prompt, messages, per-line options) with a bad one every fifth line."""
    rows, bad = [], iter(BAD * 2)
    for i in range(n):
        if i % 5 == 4:
            rows.append(next(bad))
        elif i % 3 == 0:
            rows.append(json.dumps({"id": f"q{i}", "messages": [{"role": "user", "content": QUESTIONS[i % 10]}]}))
        else:
            rows.append(json.dumps({"id": f"q{i}", "prompt": QUESTIONS[i % 10], "max_new_tokens": 4 + i % 5}))
    return rows


def spawn(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "kvchat.cli", "batch", *args], env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def without_timing(path: Path) -> list[dict]:
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    rows = [json.loads(x) for x in raw.decode().split("\n")[:-1]]
    for r in rows:
        r.pop("timing", None)
    return rows


# ---- without a model -----------------------------------------------------------------------------------
def parsed(args):
    cmd = main.commands["batch"]
    return cmd.make_context("batch", list(args)).params


def test_ray_before_in_out_is_not_read_as_an_address():
    p = parsed(["--ray", "in.jsonl", "out.jsonl"])
    assert (p["ray_address"], p["inp"], p["out"]) == ("local", "in.jsonl", "out.jsonl")
    assert parsed(["in.jsonl", "out.jsonl", "--ray"])["ray_address"] == "local"
    assert parsed(["in.jsonl", "out.jsonl", "--ray", "10.0.0.1:6379"])["ray_address"] == "10.0.0.1:6379"
    assert parsed(["--ray", "auto", "in.jsonl", "out.jsonl"])["ray_address"] == "auto"


def test_ray_option_errors_are_one_line(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 1, "prompt": "hi"}\n')
    r = CliRunner().invoke(main, ["batch", str(inp), str(tmp_path / "o.jsonl"), "--ray=nowhere"])
    assert r.exit_code == 2 and "is not a Ray address; give host:port" in r.output
    r = CliRunner().invoke(main, ["batch", str(inp), str(tmp_path / "o.jsonl"), "--workers", "3"])
    assert r.exit_code == 2 and "add --ray" in r.output
    r = CliRunner().invoke(main, ["batch", str(inp), str(tmp_path / "o.jsonl"), "--ray", "--compare-full"])
    assert r.exit_code == 2 and "--compare-full does not run on --ray" in r.output
    assert not (tmp_path / "o.jsonl").exists()


def test_without_ray_installed_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 1, "prompt": "hi"}\n')
    r = CliRunner().invoke(main, ["batch", str(inp), str(tmp_path / "o.jsonl"), "--ray"])
    assert r.exit_code == 1 and "pip install 'kvchat[ray]'" in r.output and "Traceback" not in r.output


def test_install_refuses_paths_outside_calibrations(tmp_path):
    for rel in ("../evil.json", "/etc/passwd", "models/x.json", "calibrations"):
        with pytest.raises(ValueError, match="not a file under calibrations/"):
            cache.install({rel: b"{}"})


# ---- on the embedded model -----------------------------------------------------------------------------
@pytest.mark.model
def test_a_shipped_bundle_spares_another_home_the_calibration(embedded, kvchat_home, tmp_path, monkeypatch):
    from kvchat.engine import Engine

    Engine(embedded, load_profile("razor"), max_slots=1)  # computes razor's heads or reads the run's cache
    files = cache.bundle()
    assert any(k.startswith("calibrations/") and "razor-" in k for k in files)
    other = tmp_path / "elsewhere"
    monkeypatch.setenv("KVCHAT_HOME", str(other))
    assert cache.install(files) == len(files)
    assert cache.install(files) == 0  # identical files are left alone
    before = cache.computed()
    Engine(embedded, load_profile("razor"), max_slots=1)
    assert cache.computed() == before, "the installed calibration was recomputed"


@pytest.mark.model
@pytest.mark.slow
def test_ray_two_workers_write_what_the_local_run_writes(embedded, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(mixed_rows(40)) + "\n")
    local = run_batch(OPTS, str(inp), str(tmp_path / "local.jsonl"), batch_size=3, loaded=(load_profile("razor"), embedded))
    ray_out, summary = tmp_path / "ray.jsonl", tmp_path / "summary.json"
    proc = spawn([str(inp), str(ray_out), "-p", "razor", "--max-new-tokens", "6", "--batch-size", "3", "--device", "cpu",
                  "--dtype", "float32", "--ray", "--workers", "2", "--summary", str(summary)])
    _, err = proc.communicate(timeout=600)
    err = err.decode()
    assert proc.returncode == local["exit_code"] == 3, err
    assert "Traceback" not in err and "ray (local): 2 workers" in err
    got, want = without_timing(ray_out), without_timing(tmp_path / "local.jsonl")
    assert len(got) == 40 and got == want
    s = json.loads(summary.read_text())
    assert (s["ok"], s["errors"]) == (local["ok"], local["errors"]) and s["errors"] >= 8
    assert s["completion_tokens"] == local["completion_tokens"]
    r = s["ray"]
    assert r["workers"] == 2 and r["calibration_files"] >= 1 and r["calibrations_computed_by_workers"] == 0
    assert 0 < s["kv"]["peak_bytes_held"] and s["kv"]["avg_bytes_held"] > 0


@pytest.mark.model
@pytest.mark.slow
def test_ray_driver_killed_then_resumed_gives_every_id_once(models_dir, tmp_path):
    ids = [f"k{i}" for i in range(40)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": QUESTIONS[n % 10]}) + "\n" for n, i in enumerate(ids)))
    out = tmp_path / "out.jsonl"
    args = [str(inp), str(out), "-p", "full", "--max-new-tokens", "24", "--batch-size", "1", "--device", "cpu", "--ray",
            "--workers", "2"]
    proc = spawn(args, start_new_session=True)
    try:
        t = time.time()
        while not (out.exists() and out.read_bytes().count(b"\n")) and proc.poll() is None and time.time() - t < 300:
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:  # the local Ray instance the driver started shares its session: a closed terminal ends it too
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    n = out.read_bytes().count(b"\n")
    assert 1 <= n < len(ids), n
    with open(out, "ab") as f:  # what a write cut short would leave behind
        f.write(b'{"id": "k39", "text": "Bye')
    r = spawn(args + ["--resume"])
    _, err = r.communicate(timeout=600)
    assert r.returncode == 0, err.decode()
    raw = out.read_bytes()
    assert raw.endswith(b"\n")
    got = [json.loads(x)["id"] for x in raw.decode().split("\n")[:-1]]
    assert sorted(got) == sorted(ids) and len(got) == len(set(got))
    assert f"{n:,} skipped: already in OUT" in err.decode()
