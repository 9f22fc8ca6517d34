"""The decode matmuls alone: the embedded model's 30 layers and LM head at 1-8 rows, side by side in one run.

    python benchmarks/bench_linear.py [--rows 1,2,4,8] [--rounds 15] [--dtype bfloat16]

Compares copies of the same weights (the ones the engine runs, through kernels/cpu_linear.c) in three
placements:
- kvchat's: the arena (kvchat/engine/arena.py), one huge-page-advised stream in read order, each weight
  `WEIGHT_SKEW` (32) bytes past a 64-byte boundary;
- the same arena with every weight on the 64-byte grid;
- separate torch allocations (64-byte aligned, 4 KiB pages), where the weights were before the arena.
Rounds interleave the variants; each figure is the median over rounds of one pass over every weight, as
ms and as GB/s of weight bytes. The outputs are checked equal across the variants.
"""

from __future__ import annotations

import os

os.environ["THP_MEM_ALLOC_ENABLE"] = "0"  # torch's own allocations on 4 KiB pages, as kvchat leaves them
import kvchat  # noqa: F401,E402  (before torch: sets GOMP_SPINCOUNT as the CLI does)
import argparse
import statistics
import time

import torch

from kvchat.engine.arena import WEIGHT_SKEW, Arena
from kvchat.engine.weights import Weights
from kvchat.loading import quiet_transformers
from kvchat.model import load_model
from kvchat_kernels import cpu


def one_pass(ws: list[torch.Tensor], x: dict[int, torch.Tensor]) -> tuple[float, torch.Tensor]:
    t = time.perf_counter()
    y = None
    for w in ws:
        y = cpu.linear(x[w.shape[1]], w)
    return time.perf_counter() - t, y


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args()
    quiet_transformers()
    lm = load_model(device="cpu", dtype=a.dtype)
    W = Weights.of(lm, 8)
    if W.layout != "native":
        print(f"the native matmul does not run here ({cpu.status()}; layout {W.layout})")
        return 1
    ws = [w for lw in W.layers for w in (lw.qkv.w, lw.o.w, lw.gate_up.w, lw.down.w)] + [W.lm_head.w]
    grid = Arena(skew=0)
    variants = {f"arena +{WEIGHT_SKEW} B (kvchat)": [Arena(skew=WEIGHT_SKEW).place(w) for w in ws],
                "arena, 64 B grid": [grid.place(w) for w in ws],
                "separate allocations": [w.clone() for w in ws]}
    nbytes = sum(w.numel() * w.element_size() for w in ws)
    print(f"{lm.desc.name} matmuls in {lm.desc.dtype}: {len(ws)} weights, {nbytes / 2**20:.0f} MiB a pass, "
          f"{torch.get_num_threads()} threads, median of {a.rounds} rounds; huge pages advised: {grid.advised > 0}")
    print(f"{'rows':>4} | " + " | ".join(f"{k:>24}" for k in variants) + " | kvchat vs separate, vs grid")
    g = torch.Generator().manual_seed(0)
    for M in map(int, a.rows.split(",")):
        x = {K: torch.randn(M, K, generator=g).to(lm.desc.dtype) for K in {w.shape[1] for w in ws}}
        times = {k: [] for k in variants}
        outs = {}
        for _ in range(a.rounds):
            for name, copies in variants.items():
                dt, outs[name] = one_pass(copies, x)
                times[name].append(dt)
        ref = outs["separate allocations"]
        assert all(torch.equal(o, ref) for o in outs.values()), "the placements disagree"
        med = [statistics.median(v) for v in times.values()]
        cells = " | ".join(f"{m * 1e3:7.2f} ms {nbytes / m / 1e9:5.1f} GB/s" for m in med)
        print(f"{M:>4} | {cells} | {med[2] / med[0]:.2f}x, {med[1] / med[0]:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
