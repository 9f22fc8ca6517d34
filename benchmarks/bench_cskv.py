"""CSKV on the embedded model: the density sweep, generated tasks, the bytes held, decode speed against full.

    KVCHAT_HOME=/tmp/kvhome python benchmarks/bench_cskv.py sweep [--densities 0.25,0.5,0.75]
        [--pairs 0.5:0.5,0.5:0.25] [--bits 0,4] [--v-bits 2] [--group 16] [--qgroup 32] [--window 32]
        [--train-steps 0,40] [--sink 4] [--text /usr/share/common-licenses/GPL-3] [--prefill 1536] [--forced 512]
    KVCHAT_HOME=/tmp/kvhome python benchmarks/bench_cskv.py tasks --pairs 0.5:0.5 --train-steps 40 [--cases 6]
        [--lengths 1536,2048] [--split heldout] [--profiles cskv,cskv-kivi4]
    KVCHAT_HOME=/tmp/kvhome python benchmarks/bench_cskv.py bytes --pairs 0.5:0.5 --bits 4 --group 32
    KVCHAT_HOME=/tmp/kvhome python benchmarks/bench_cskv.py speed [--tokens 2048] [--steps 48] [--profiles cskv,cskv-kivi4]

sweep: for every (k_density, v_density, train_steps, bits): pass keys found on bench_methods' 6 needle
depths (1.5k-token prompts); held / full bytes at the end of their prefill in the run's dtype (max over
the 6) and in bfloat16 (`held bf16`: every layer's format built in bfloat16 and fed the prompt's K/V, as
tests/test_cskv_model.py does; bytes do not depend on the values); and on a real text the factors were
not calibrated on (default: the GPL-3 licence text, Python's docs being the calibration text) the mean
next-token KL(full || cskv) and top-1 agreement over `forced` teacher-forced decode steps through
Engine.feed after prefilling the first `prefill` tokens (full runs the same steps once).
tasks: kvchat's generated retrieval tasks (kvchat.quality: passkey and reassign, seeds of the held-out
split unless --split tuning, `cases` per task and length), answered greedily by full and each point.
bytes: where a point's bytes go at the end of prefill on the needle prompt, pool by pool, in bfloat16.
speed: decode tokens/s of full and cskv on one 2,048-token prompt, timed in alternating rounds in one
run (the machine is shared: the ratio is the figure).
"""

from __future__ import annotations

import kvchat  # noqa: F401  (first: sets GOMP_SPINCOUNT before torch loads, as the CLI does)
import argparse
import dataclasses
import itertools
import time
from collections import Counter
from pathlib import Path

import torch

from bench_methods import DEPTHS, needle_prompt, needles
from kvchat.engine import Engine, Request, SamplingParams
from kvchat.methods.cskv import CSKV
from kvchat.model import load_model
from kvchat.profiles import Profile, load_profile
from kvchat.quality.evaluate import Settings, plan, run_case


def found_needles(lm, methods, prompts) -> tuple[int, float]:
    found, held = 0, 0.0
    for ids, key in prompts:
        eng = Engine(lm, Profile("c", methods=methods()))
        seq = eng.start(Request("n", ids, SamplingParams(max_new_tokens=12)))
        held = max(held, eng.store.slot_held(seq.slot) / eng.store.slot_full(seq.slot))
        while not seq.finish:
            eng.step([seq])
        found += str(key) in seq.text
    return found, held


def forced_logprobs(lm, methods, ids: list[int], prefill: int) -> tuple[torch.Tensor, float]:
    """Log-probabilities (steps, vocab) of every teacher-forced step after prefilling ids[:prefill], and
    held / full at the end."""
    eng = Engine(lm, Profile("c", methods=methods))
    seq = eng.start(Request("t", ids[:prefill], SamplingParams(max_new_tokens=len(ids))))
    out = [torch.log_softmax(eng.feed([seq], [t])[0].float(), -1) for t in ids[prefill:-1]]
    return torch.stack(out), eng.store.slot_held(seq.slot) / eng.store.slot_full(seq.slot)


def points(a) -> list[tuple[str, callable]]:
    """(label, a function making the method list) for every point the options name."""
    dens = [float(x) for x in a.densities.split(",")]
    pairs = ([tuple(float(x) for x in p.split(":")) for p in a.pairs.split(",")] if a.pairs
             else list(itertools.product(dens, dens)))
    out = []
    for (kd, vd), st, bits in itertools.product(pairs, [int(x) for x in a.train_steps.split(",")],
                                                [int(b) for b in a.bits.split(",")]):
        vb = a.v_bits if bits else None
        m = CSKV(k_density=kd, v_density=vd, train_steps=st, sink=a.sink, bits=bits, v_bits=vb, group=a.group,
                 qgroup=a.qgroup, window=a.window)
        bits_s = f"{bits}/{vb or bits}" if bits else "-"
        out.append((f"{kd:>6} {vd:>6} {st:>5} {bits_s:>4} {a.group:>5} {a.window:>6}",
                    lambda m=m: [dataclasses.replace(m)]))
    return out


HEAD = f"{'k_dens':>6} {'v_dens':>6} {'steps':>5} {'bits':>4} {'group':>5} {'window':>6}"


def bf16_trace(lm, ids: list[int]) -> list[tuple]:
    """Each layer's (k_pre, k, v) of `ids` from the run's model, cast to bfloat16: what a bfloat16 run's
    formats are fed (the fp32 model computes them: bf16 matmuls are ~7x slower on this CPU)."""
    out = [None] * lm.desc.n_layers
    bf = lambda x: x.to(torch.bfloat16)  # noqa: E731

    def keep(layer, t):
        out[layer] = (bf(t["k_pre"]), bf(t["k"]), bf(t["v"]))

    Engine(lm, Profile("full")).probe.run(ids, trace=keep)
    return out


def bf16_formats(lm, method, trace) -> tuple[list, int]:
    """Every layer's format of a bound `method` built in bfloat16 and fed `trace` as one prefill chunk,
    then sealed -> (formats, bytes_full of the same tokens in bfloat16)."""
    d = dataclasses.replace(lm.desc, dtype=torch.bfloat16)
    fmts = [method.make_format(l, 1, 16, d, False, 0) for l in range(d.n_layers)]
    n = trace[0][0].shape[0]
    for f, kv in zip(fmts, trace):
        f.append_chunk(0, *kv, torch.arange(n))
        f.seal([0])
    return fmts, n * d.kv_bytes_per_token


def breakdown(fmts) -> Counter:
    """Bytes held by pool over `fmts`: sealed rows (per token and per group), the index, the tail's blocks."""
    out = Counter()
    for f in fmts:
        n = sum(f.slot_groups)
        for name, t in (*f.tok.items(), *f.grp.items()):
            kind = "token" if name in f.tok else "group"
            out[f"sealed {name} (per {kind}, {tuple(t.shape[1:])} {str(t.dtype)[6:]})"] += n * (t[0].nbytes if n else 0)
        out["sealed index (block id + count, int32)"] += f.meta_bytes()
        pages = f.tail.pages
        for name, t in pages.pools.items():
            out[f"tail {name} ({pages.bs}-token blocks, {str(t.dtype)[6:]})"] += sum(pages.slot_blocks) * t[0].nbytes
        out["tail table + lengths"] += pages.meta_bytes()
    return out


def held_bf16(lm, method, trace) -> float:
    fmts, full = bf16_formats(lm, method, trace)
    return sum(f.bytes_held() for f in fmts) / full


def sweep(lm, a) -> None:
    ids = lm.tokenizer(open(a.text).read(), add_special_tokens=False)["input_ids"][: a.prefill + a.forced + 1]
    prompts = needles(lm, a.tokens)
    print(f"text: {a.text}, {len(ids)} tokens (prefill {a.prefill}, {len(ids) - 1 - a.prefill} forced steps); "
          f"needle: 6 prompts of {min(len(p) for p, _ in prompts)}-{max(len(p) for p, _ in prompts)} tokens, "
          f"depths {', '.join(f'{d:.0%}' for d in DEPTHS)}; sink {a.sink}, qgroup {a.qgroup}; {lm.desc.dtype}", flush=True)
    ref, _ = forced_logprobs(lm, [], ids, a.prefill)
    trace = bf16_trace(lm, prompts[0][0])  # the six prompts have one length: one trace gives their bytes
    print(f"{HEAD} {'needle':>6} {'held':>6} {'held bf16':>9} {'KL':>8} {'top1':>6}", flush=True)
    for label, make in points(a):
        eng = Engine(lm, Profile("c", methods=make()))  # calibrates once (cached) before anything is timed
        found, held = found_needles(lm, make, prompts)
        lp, _ = forced_logprobs(lm, make(), ids, a.prefill)
        kl = (ref.exp() * (ref - lp)).sum(-1).mean().item()
        top1 = (ref.argmax(-1) == lp.argmax(-1)).float().mean().item()
        print(f"{label} {found:>4}/6 {held:>6.1%} {held_bf16(lm, eng.methods[0], trace):>9.1%} {kl:>8.4f} {top1:>6.1%}",
              flush=True)


def tasks(lm, a) -> None:
    s = Settings(lengths=tuple(int(x) for x in a.lengths.split(",")), cases=a.cases, split=a.split)
    cases = plan(lm.tokenizer, s)
    print(f"{len(cases)} cases: {', '.join(s.tasks)} x {a.cases} {s.split} seeds x lengths {a.lengths} "
          f"({min(len(c.prompt_ids) for c in cases)}-{max(len(c.prompt_ids) for c in cases)} tokens); {lm.desc.dtype}",
          flush=True)
    print(f"{HEAD} {' '.join(f'{t:>9}' for t in s.tasks)} {'held':>6}", flush=True)
    named = [(f"{Path(n).stem:>{len(HEAD)}}", lambda n=n: load_profile(n).methods) for n in (a.profiles or "").split(",") if n]
    for label, make in [(f"{'full':>{len(HEAD)}}", list)] + (named or points(a)):
        eng = Engine(lm, Profile("c", methods=make()))
        rows = [run_case(eng, c, s.max_new_tokens) for c in cases]
        acc = [sum(r["correct"] for r in rows if r["task"] == t) for t in s.tasks]
        n = [sum(r["task"] == t for r in rows) for t in s.tasks]
        print(f"{label} {' '.join(f'{c:>6}/{k:<2}' for c, k in zip(acc, n))} {max(r['held_prefill'] for r in rows):>6.1%}",
              flush=True)


def bytes_(lm, a) -> None:
    ids = needles(lm, a.tokens)[0][0]
    trace = bf16_trace(lm, ids)
    for label, make in points(a):
        eng = Engine(lm, Profile("c", methods=make()))
        fmts, full = bf16_formats(lm, eng.methods[0], trace)
        parts, held = breakdown(fmts), sum(f.bytes_held() for f in fmts)
        assert sum(parts.values()) == held == sum(f.storage_bytes() for f in fmts), (sum(parts.values()), held)
        f = fmts[0]
        print(f"\n{HEAD}\n{label}: {len(ids)} tokens, bfloat16, per (layer, KV head): {f.tail.host[0][0]} tokens in "
              f"the tail, {f.slot_groups[0] // f.n_kv} groups of {f.group} sealed; held {held:,} of {full:,} bytes = "
              f"{held / full:.2%}")
        for name, b in parts.most_common():
            print(f"  {name:<52} {b:>11,} {b / full:>7.2%} of full")


def speed(lm, a) -> None:
    ids = needle_prompt(lm.tokenizer, a.tokens, 0.5, 12345)
    runs = {}
    names = [n for n in (a.profiles or "cskv").split(",") if n]
    for name, methods in [("full", [])] + [(Path(n).stem, load_profile(n).methods) for n in names]:
        eng = Engine(lm, Profile(name, methods=methods))
        runs[name] = (eng, eng.start(Request(name, ids, SamplingParams(max_new_tokens=10**6))), [])
    rounds = 4
    for _ in range(rounds):  # alternate, so both see the same machine
        for name, (eng, seq, times) in runs.items():
            tok = seq.out[-1]
            t = time.perf_counter()
            for _ in range(a.steps // rounds):
                tok = int(eng.feed([seq], [tok])[0].argmax())
            times.append(time.perf_counter() - t)
    tps = {n: rounds * (a.steps // rounds) / sum(t) for n, (_, _, t) in runs.items()}
    print(f"decode after a {len(ids)}-token prompt ({a.steps} steps each, {rounds} alternating rounds, {lm.desc.dtype}): "
          + ", ".join(f"{n} {v:.2f} tok/s ({v / tps['full']:.2f}x full)" for n, v in tps.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["sweep", "tasks", "bytes", "speed"])
    ap.add_argument("--densities", default="0.25,0.5,0.75")
    ap.add_argument("--train-steps", default="0")
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--pairs", default=None, help="k:v density pairs instead of every pair of --densities, e.g. 0.5:0.5,0.5:0.25")
    ap.add_argument("--bits", default="0", help="feature quantization: 0 (none), 2 or 4; a list sweeps")
    ap.add_argument("--v-bits", type=int, default=None, help="value features' bits with --bits (default: --bits)")
    ap.add_argument("--group", type=int, default=16, help="tokens sealed together (and sharing key scales with --bits)")
    ap.add_argument("--window", type=int, default=32, help="newest tokens kept in full precision")
    ap.add_argument("--qgroup", type=int, default=32, help="value feature channels sharing a scale (--bits)")
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--prefill", type=int, default=1536)
    ap.add_argument("--forced", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=None, help="needle prompt tokens (sweep, 1600) / speed prompt (2048)")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--cases", type=int, default=6, help="tasks: cases per task and length")
    ap.add_argument("--lengths", default="1536,2048", help="tasks: prompt lengths")
    ap.add_argument("--split", default="heldout", choices=["heldout", "tuning"], help="tasks: seed split")
    ap.add_argument("--profiles", default=None, help="tasks, speed: shipped profile names or YAML paths instead of points, "
                    "e.g. cskv,cskv-kivi4 (full is always first)")
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    lm = load_model(device="cpu", dtype=a.dtype)
    if a.what in ("sweep", "tasks", "bytes"):
        a.tokens = a.tokens or 1600
        {"sweep": sweep, "tasks": tasks, "bytes": bytes_}[a.what](lm, a)
    else:
        a.tokens = a.tokens or 2048
        speed(lm, a)


if __name__ == "__main__":
    main()
