"""Two builds of the native CPU library side by side in one process: a decode's native layer calls
timed with each build in turn, so the machine's drift hits both alike.

    python benchmarks/bench_native_ab.py REV [--profile full] [--length 4096] [--batch 4] [--steps 200]
        [--dtype auto] [--threads 2]

Builds the library's C sources (kernels/cpu.py's list) as of git revision REV and as they are in this
checkout, with the library's own flags (`cpu.build_flags`), into a temporary directory; prefills
`--batch` prompts of `--length` tokens (bench_generate's filler) under `--profile`, then decodes
`--steps` steps, switching build every two steps (first A: REV, then B: this checkout, then A...), and
prints each build's median and mean time of the native layer calls and B / A.

Why a benchmark of its own: on this project's shared 2-core machines a run's speed drifts by more than
most kernel changes move it, so two separate runs cannot tell them apart; and a change to one C function
can change the code generated for loops it does not touch (the column sums' loops, inlined into the
attention's parallel region, made `full` ~5% slower, which only a paired run showed). Both builds run on
the weights as this checkout lays them out: compare revisions whose weight layout is the same.
"""

from __future__ import annotations

import kvchat  # noqa: F401  (first: sets GOMP_SPINCOUNT before torch loads, as the CLI does)
import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_generate import PROFILES, prompts
from kvchat.engine import Engine, Request, SamplingParams
from kvchat.engine import forward as forward_mod
from kvchat.loading import quiet_transformers
from kvchat.model import load_model
from kvchat.profiles import load_profile
from kvchat_kernels import cpu, cpu_layer

REPO = Path(__file__).resolve().parents[1]


def sources_at(rev: str | None, into: Path) -> list[Path]:
    """The library's sources and headers as of `rev` (None: this checkout) copied into `into`."""
    into.mkdir(parents=True)
    out = []
    for src in cpu._SOURCES + cpu._HEADERS:
        rel = f"kernels/{src.name}"
        if rev is None:
            text = src.read_text()
        else:
            res = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{rel}"], capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(f"bench_native_ab: cannot read {rel} at {rev!r}: {res.stderr.strip()} "
                                 "(give a commit of this repository that has the native library)")
            text = res.stdout
        (into / src.name).write_text(text)
        out.append(into / src.name)
    return out


def build(rev: str | None, tmp: Path, name: str, fallback: ctypes.CDLL | None = None) -> ctypes.CDLL:
    """REV's C sources (None: this checkout's) built and bound; functions REV's lack come from `fallback`."""
    files = sources_at(rev, tmp / name)
    so = tmp / f"{name}.so"
    cc = cpu._compiler()
    if cc is None:
        raise SystemExit("bench_native_ab: no C compiler (install gcc, or set CC)")
    res = subprocess.run([cc, *cpu.build_flags(), *[str(f) for f in files if f.suffix == ".c"], "-o", str(so),
                          "-lm"], capture_output=True, text=True, cwd=tmp / name, timeout=300)
    if res.returncode != 0:
        raise SystemExit(f"bench_native_ab: building {name} failed: {res.stderr.strip()[-400:]}")
    return cpu.bind(ctypes.CDLL(str(so)), fallback)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rev", help="the git revision to compare this checkout's C sources with (A)")
    ap.add_argument("--profile", default="full")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if not cpu.enabled():
        raise SystemExit("bench_native_ab: the native CPU library is not in use here (KVCHAT_NATIVE=0, or no build)")
    torch.set_num_threads(a.threads)
    quiet_transformers()
    with tempfile.TemporaryDirectory(prefix="kvchat-ab-") as d:
        libs = {"B": build(None, Path(d), "B")}
        libs["A"] = build(a.rev, Path(d), "A", libs["B"])
        lm = load_model(device="cpu", dtype=a.dtype)  # weights laid out by this checkout's library
        lm.eos_ids = frozenset()  # exactly --steps tokens
        current = ["B"]
        for mod in (cpu, cpu_layer):  # every native call looks the library up through these two names
            mod._lib = lambda: libs[current[0]]
        spent = [0.0]  # this step's native calls (a profile whose methods act between layers makes several)
        run = forward_mod.cpu_layer.run

        def timed(*args):
            t0 = time.perf_counter()
            run(*args)
            spent[0] += time.perf_counter() - t0

        forward_mod.cpu_layer.run = timed
        eng = Engine(lm, load_profile(str(PROFILES / f"{a.profile}.yaml")), max_slots=a.batch)
        seqs = [eng.start(Request(str(i), ids, SamplingParams(max_new_tokens=a.steps + 1)))
                for i, ids in enumerate(prompts(lm.tokenizer, a.length, a.batch))]
        times: dict[str, list[float]] = {"A": [], "B": []}
        for step in range(a.steps):
            current[0] = "A" if (step // 2) % 2 == 0 else "B"
            spent[0] = 0.0
            eng.step([s for s in seqs if not s.finish])
            times[current[0]].append(spent[0])
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    print(f"{a.profile}, {a.length} prompt tokens x {a.batch}, {a.steps} steps, {lm.desc.dtype}; "
          f"the native layer calls of a step, ms")
    for k, label in (("A", a.rev), ("B", "this checkout")):
        print(f"  {k} ({label}): median {med[k]:.2f}, mean {1e3 * statistics.mean(times[k]):.2f}, "
              f"{len(times[k])} steps")
    print(f"  B / A: {med['B'] / med['A']:.3f} (medians)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
