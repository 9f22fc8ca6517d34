"""`kvchat batch` locally vs `kvchat batch --ray --workers N` on the same file, side by side in one run.

    python benchmarks/bench_ray.py [--n-prompts 64] [--max-new-tokens 32] [--batch-size 4] [--workers 2]
                                   [--profile razor] [--address HOST:PORT]

Both runs are the real command (a subprocess each, as a user types it), greedy, on the same generated
prompts (short questions with a few hundred tokens of context), with a shared KVCHAT_HOME so neither
converts the model or calibrates inside the timing: a warm-up run of the local path fills it first.
Prints per run: wall seconds of the whole command, generated tokens/s over the run (the summary's), and
for Ray the start-up stages (Ray up, calibration shipped, first lines back). Whether the outputs are the
same line for line (timings aside) is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["rivers", "bridges", "clocks", "bread", "maps", "glass", "bees", "trains"]


def rows(n: int) -> list[dict]:
    out = []
    for i in range(n):
        t = TOPICS[i % len(TOPICS)]
        context = f"Notes on {t}. " + " ".join(f"Fact {j} about {t}: item {i * 7 + j} is filed under shelf {j % 5}."
                                               for j in range(12 + i % 8))
        out.append({"id": f"r{i}", "prompt": f"{context}\nIn one sentence, what are these notes about?"})
    return out


def run(args: list[str], env: dict) -> tuple[float, dict, str]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "kvchat.cli", "batch", *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode not in (0, 3):
        sys.exit(f"kvchat batch {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return wall, p.stdout, p.stderr


def lines(path: Path) -> list[dict]:
    out = [json.loads(x) for x in path.read_text().splitlines()]
    for r in out:
        r.pop("timing", None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--profile", default="razor")
    ap.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local instance")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kvchat-bench-ray-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.setdefault("KVCHAT_HOME", str(tmp / "home"))
    inp = tmp / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows(a.n_prompts)))
    common = ["-p", a.profile, "--max-new-tokens", str(a.max_new_tokens), "--batch-size", str(a.batch_size),
              "--dtype", "float32", "--no-progress"]
    warm = tmp / "warm.jsonl"
    warm.write_text(inp.read_text().splitlines()[0] + "\n")
    run([str(warm), str(tmp / "warm-out.jsonl"), *common], env)  # converts the model and calibrates once

    results = {}
    ray_flag = ["--ray"] + ([a.address] if a.address else [])
    for name, extra in (("local", []), (f"ray x{a.workers}", ray_flag + ["--workers", str(a.workers)])):
        out, summary = tmp / f"{name.replace(' ', '-')}.jsonl", tmp / f"{name.replace(' ', '-')}.json"
        wall, _, _ = run([str(inp), str(out), *common, "--summary", str(summary), *extra], env)
        results[name] = (wall, json.loads(summary.read_text()), out)

    print(f"{a.n_prompts} prompts x {a.max_new_tokens} new tokens, profile {a.profile}, batch size {a.batch_size}, "
          f"{os.cpu_count()} cores")
    print(f"{'run':<10} {'wall s':>8} {'tokens/s':>9} {'ray up s':>9} {'calib s':>8} {'1st line s':>11}")
    for name, (wall, s, _) in results.items():
        r = s.get("ray", {})
        cells = [f"{r[k]:.1f}" if k in r else "-" for k in ("ray_start_s", "calibration_s", "first_line_s")]
        print(f"{name:<10} {wall:>8.1f} {s['tokens_per_s']:>9.1f} {cells[0]:>9} {cells[1]:>8} {cells[2]:>11}")
    (lw, ls, lout), (rw, rs, rout) = results.values()
    print(f"ray / local: wall {lw / rw:.2f}x faster, tokens/s {rs['tokens_per_s'] / ls['tokens_per_s']:.2f}x; "
          f"same lines (timings aside): {lines(lout) == lines(rout)}")


if __name__ == "__main__":
    main()
