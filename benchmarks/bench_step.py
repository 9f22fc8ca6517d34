"""Where a decode step's time goes, per part, on the embedded model: the profile to read before speeding
up the loop.

    python benchmarks/bench_step.py [--profiles full,razor,d2o] [--length 4096] [--batch 4] [--new 135]
        [--dtype auto] [--threads 2]

Each profile prefills `--batch` prompts of `--length` tokens (bench_generate's filler text) and decodes
`--new` greedy steps; timers wrapped around the engine's parts add up their wall time. Printed per
profile, in ms per step (each part without the parts inside it, so the rows sum to the step):

  native    the one native call per run of layers (kernels/cpu_layer.py: projections, attention, MLP)
  lm_head   the tied LM head matmul
  hooks     the methods' per-layer decode hooks (`after_decode_layer`: scoring, evicting, folding)
  decode    the rest of the forward: embedding, RoPE tables, each layer's store bookkeeping and call setup
  after     the methods' per-step hooks (`after_decode`) and sealing
  note      the store's usage bookkeeping (`KVStore.note`)
  accept    sampling, detokenizing, stop strings
  other     the rest of `Engine.step` (building the step's index tensors)

Timers cost a few microseconds a call, so figures are a little above an untimed run's; compare profiles or
commits within one run of this script, not against bench_generate's tokens/s.
"""

from __future__ import annotations

import kvchat  # noqa: F401  (first: sets GOMP_SPINCOUNT before torch loads, as the CLI does)
import argparse
import time
from collections import defaultdict

import torch

from bench_generate import PROFILES, prompts
from kvchat.engine import Engine, Request, SamplingParams
from kvchat.engine import forward as forward_mod
from kvchat.loading import quiet_transformers
from kvchat.model import load_model
from kvchat.profiles import load_profile

PARTS = ["native", "lm_head", "hooks", "decode", "after", "note", "accept", "other"]


class Timers:
    """Wall time per part, each part's own time (time in a nested timed part goes to that part only)."""

    def __init__(self):
        self.own = defaultdict(float)
        self._stack: list[list] = []  # [part, start, time spent in nested parts]

    def wrap(self, fn, part: str):
        def timed(*args, **kwargs):
            self._stack.append([part, time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                name, t0, inner = self._stack.pop()
                spent = time.perf_counter() - t0
                self.own[name] += spent - inner
                if self._stack:
                    self._stack[-1][2] += spent
        return timed

    def patch(self, obj, attr: str, part: str, undo: list) -> None:
        old, own = getattr(obj, attr), attr in vars(obj)
        setattr(obj, attr, self.wrap(old, part))
        undo.append((obj, attr, old if own else None))


def measure(lm, profile, batch_ids, new: int) -> tuple[dict[str, float], int]:
    """-> ({part: seconds}, steps) over `new` decode steps of `batch_ids` together."""
    eng = Engine(lm, profile, max_slots=len(batch_ids))
    eos, lm.eos_ids = lm.eos_ids, frozenset()  # exactly `new` tokens each
    t, undo = Timers(), []
    try:
        seqs = [eng.start(Request(str(i), ids, SamplingParams(max_new_tokens=new + 1)))
                for i, ids in enumerate(batch_ids)]
        t.patch(forward_mod.cpu_layer, "run", "native", undo)
        t.patch(eng.runner, "lm_head", "lm_head", undo)
        t.patch(eng.runner, "decode", "decode", undo)
        for m in eng.methods:
            t.patch(m, "after_decode_layer", "hooks", undo)
            t.patch(m, "after_decode", "after", undo)
        t.patch(eng.store, "seal", "after", undo)
        t.patch(eng.store, "note", "note", undo)
        t.patch(eng, "_accept", "accept", undo)
        step = t.wrap(eng.step, "other")
        steps = 0
        while not all(s.finish for s in seqs):
            step([s for s in seqs if not s.finish])
            steps += 1
    finally:
        for obj, attr, old in reversed(undo):  # an instance's own attribute back, a method's shadow gone
            setattr(obj, attr, old) if old is not None else delattr(obj, attr)
        lm.eos_ids = eos
    return dict(t.own), steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default="full,razor,d2o")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new", type=int, default=135, help="decode steps timed")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    quiet_transformers()
    lm = load_model(device="cpu", dtype=a.dtype)
    Engine(lm, load_profile(str(PROFILES / "full.yaml"))).generate(prompts(lm.tokenizer, 64, 1)[0])  # warm up
    batch_ids = prompts(lm.tokenizer, a.length, a.batch)
    names = a.profiles.split(",")
    print(f"{a.length} prompt tokens x {a.batch}, {a.new} steps, {lm.desc.dtype}; ms per step")
    print(f"{'profile':<10}" + "".join(f"{p:>9}" for p in PARTS) + f"{'step':>9}{'tok/s':>9}")
    for name in names:
        own, steps = measure(lm, load_profile(str(PROFILES / f"{name}.yaml")), batch_ids, a.new)
        ms = {p: 1e3 * own.get(p, 0.0) / steps for p in PARTS}
        total = sum(ms.values())
        print(f"{name:<10}" + "".join(f"{ms[p]:>9.2f}" for p in PARTS) + f"{total:>9.2f}"
              f"{1e3 * a.batch / total:>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
