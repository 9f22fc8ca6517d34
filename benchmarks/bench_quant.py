"""KV quantization profiles on the embedded model: bytes, needles, next-token KL and top-1 against full,
decode speed against full, and the bytes the GPU kernel reads per token.

    KVCHAT_HOME=/tmp/kvhome python benchmarks/bench_quant.py [--profiles kv8,kv4,kivi4,kivi2,razor-kivi4,pyramid-kivi4]
        [--parts needles,kl,speed,kernel] [--dtype bfloat16] [--kl-prefill 1024] [--kl-tokens 1024]
        [--kl-offsets 5000,60000] [--speed-tokens 2048] [--batches 1,4] [--steps 32]

needles: benchmarks/bench_methods.py's 6 depths; found, and held / full KV bytes at the end of prefill.
kl: a window of Python's own docs (kvchat.calibration.data.read_text): prefill --kl-prefill tokens, then
    teacher-force the next --kl-tokens one decode step at a time (Engine.feed), the same for full; mean
    KL(full || profile) of the next-token distributions and top-1 agreement, per text window (the first
    window was used to choose the defaults, the others are held out).
speed: decode tokens/s of each profile against full on --speed-tokens-token prompts, batch 1 and 4,
    side by side in one run (rounds alternate, best of 2), then a torch profile of the first profile's
    decode steps: where the time goes.
kernel: bytes the decode kernel reads per token of context (codes, scales, offsets, group table, the
    full-precision tail) against full's paged kernel (K, V, block table): on a bandwidth-bound GPU the
    ratio is the expected attention speed-up.
"""

from __future__ import annotations

import kvchat  # noqa: F401  (first: sets GOMP_SPINCOUNT before torch loads, as the CLI does)
import argparse
import importlib.util
import time
from pathlib import Path

import torch

from kvchat.calibration.data import read_text
from kvchat.cache.sealed import SealedFormat
from kvchat.engine import Engine, Request, SamplingParams
from kvchat.loading import quiet_transformers
from kvchat.model import load_model

HERE = Path(__file__).resolve().parent


def _bench_methods():
    spec = importlib.util.spec_from_file_location("bench_methods", HERE / "bench_methods.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BM = _bench_methods()
profile = BM.profile


# ---- next-token KL against full ------------------------------------------------------------------------
def teacher_forced(lm, name: str, ids: list[int], n_prefill: int) -> torch.Tensor:
    """Log-probabilities (len(ids) - n_prefill, vocab) of each next token after the prefix, one decode step
    a token, the cache compressed as in generation."""
    eng = Engine(lm, profile(name))
    seq = eng.start(Request("kl", ids[:n_prefill], SamplingParams(max_new_tokens=10**9)))
    out = []
    for t in ids[n_prefill:]:
        out.append(torch.log_softmax(eng.feed([seq], [t])[0].float(), -1))
    return torch.stack(out)


def kl_table(lm, names, offsets, n_prefill, n_tokens) -> dict:
    text = lm.tokenizer(read_text(None), add_special_tokens=False)["input_ids"]
    res = {}
    for off in offsets:
        ids = text[off : off + n_prefill + n_tokens]
        full = teacher_forced(lm, "full", ids, n_prefill)
        for n in names:
            lp = teacher_forced(lm, n, ids, n_prefill)
            kl = (full.exp() * (full - lp)).sum(-1)
            res[(n, off)] = (float(kl.mean()), float((lp.argmax(-1) == full.argmax(-1)).float().mean()))
            print(f"kl {n:12} window @{off}: KL {res[(n, off)][0]:.4f}, top-1 {res[(n, off)][1]:.2%}", flush=True)
    return res


# ---- decode speed --------------------------------------------------------------------------------------
def _engine_at(lm, name, prompts):
    eng = Engine(lm, profile(name), max_slots=len(prompts))
    seqs = [eng.start(Request(str(i), p, SamplingParams(max_new_tokens=10**9))) for i, p in enumerate(prompts)]
    for _ in range(2):  # warm up
        eng.feed(seqs, [5] * len(seqs))
    return eng, seqs


def decode_rate(eng, seqs, steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
        eng.feed(seqs, [5] * len(seqs))
    return len(seqs) * steps / (time.perf_counter() - t)


def speed(lm, names, n_tokens, batches, steps):
    text = lm.tokenizer(read_text(None), add_special_tokens=False)["input_ids"]
    for B in batches:
        prompts = [text[i * 3000 : i * 3000 + n_tokens] for i in range(B)]
        engines = {n: _engine_at(lm, n, prompts) for n in ["full", *names]}
        best = {n: 0.0 for n in engines}
        for _ in range(2):  # rounds alternate between profiles: load changes hit them alike
            for n, (eng, seqs) in engines.items():
                best[n] = max(best[n], decode_rate(eng, seqs, steps))
        line = "  ".join(f"{n} {r:.1f} tok/s ({r / best['full']:.2f}x)" for n, r in best.items())
        print(f"speed {n_tokens} tokens, batch {B}: {line}", flush=True)
    eng, seqs = engines[names[0]]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        decode_rate(eng, seqs, steps)
    print(f"profile of {names[0]} decode, batch {len(seqs)}, {steps} steps:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


# ---- bytes the decode kernel reads -------------------------------------------------------------------------
def kernel_bytes(fmt, slot: int) -> int:
    """Bytes one decode step's attention reads for `slot` at one layer."""
    if not isinstance(fmt, SealedFormat):  # dense: K, V (and bias) rows of the used blocks, the block table
        pages = fmt.pages
        per = sum(p[0].nbytes for n, p in pages.pools.items() if n != "pos")
        blocks = sum(-(-n // pages.bs) for n in fmt.host[slot])
        return blocks * per + blocks * 4 + pages.lengths[slot].nbytes
    pools = [t for n, t in fmt.tok.items() if n != "pos"] + list(fmt.grp.values())
    per_group = sum(t[0].nbytes for t in pools) + 8  # codes, scales, offsets (no positions); id + count
    return sum(len(g) for g in fmt.groups[slot]) * per_group + kernel_bytes(fmt.tail, slot)


def kernel_table(lm, names, n_tokens):
    text = lm.tokenizer(read_text(None), add_special_tokens=False)["input_ids"][:n_tokens]
    per_token = {}
    for n in ["full", *names]:
        eng = Engine(lm, profile(n))
        eng.start(Request("k", text, SamplingParams(max_new_tokens=1)))
        per_token[n] = sum(kernel_bytes(f, 0) for f in eng.store.owned()) / n_tokens
    for n, b in per_token.items():
        print(f"kernel reads {n:12} {b:8.0f} B/token of context ({b / per_token['full']:.1%} of full's; "
              f"expected attention speed-up {per_token['full'] / b:.2f}x on a bandwidth-bound GPU)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default="kv8,kv4,kivi4,kivi2,razor-kivi4,pyramid-kivi4")
    ap.add_argument("--parts", default="needles,kl,speed,kernel")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kl-prefill", type=int, default=1024)
    ap.add_argument("--kl-tokens", type=int, default=1024)
    ap.add_argument("--kl-offsets", default="5000,60000")
    ap.add_argument("--speed-profiles", default="kivi4")
    ap.add_argument("--speed-tokens", type=int, default=2048)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--steps", type=int, default=32)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    quiet_transformers()
    lm = load_model(device="cpu", dtype=a.dtype)
    names, parts = a.profiles.split(","), a.parts.split(",")
    print(f"model {lm.desc.name}, {a.dtype}, {torch.get_num_threads()} threads")
    if "needles" in parts:
        prompts = BM.needles(lm, 1600)
        print(f"needle: {len(prompts)} prompts of {len(prompts[0][0])} tokens")
        for n in ["full", *names]:
            r = BM.run_needles(lm, n, prompts)
            print(f"needle {n:12} found {r['found']}/6, held/full at end of prefill {r['held']:.1%}, "
                  f"prefill {r['prefill_s']:.2f} s", flush=True)
    if "kl" in parts:
        kl_table(lm, names, [int(x) for x in a.kl_offsets.split(",")], a.kl_prefill, a.kl_tokens)
    if "kernel" in parts:
        kernel_table(lm, names, a.speed_tokens)
    if "speed" in parts:
        speed(lm, a.speed_profiles.split(","), a.speed_tokens, [int(b) for b in a.batches.split(",")], a.steps)


if __name__ == "__main__":
    main()
