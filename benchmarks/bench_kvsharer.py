"""KVSharer on the embedded model: the sweep behind its defaults, its compositions, and decode speed.

    KVCHAT_HOME=/tmp/kvhome python benchmarks/bench_kvsharer.py sweep [--layers 2,4,6,8,10] [--threshold 0.5]
    KVCHAT_HOME=/tmp/kvhome python benchmarks/bench_kvsharer.py profiles [--profiles full,kvsharer,...]
    KVCHAT_HOME=/tmp/kvhome python benchmarks/bench_kvsharer.py speed [--prompt 1024] [--steps 128]

sweep: one search for the largest s with the shipped `kvsharer` profile's other parameters (a real
calibration, cached); the map for a smaller s is that search's first s shares (a search only adds
shares, each decided on the ones before it), cached under its own parameters. Per s, and per profile
for `profiles`:
- needle: pass keys found at bench_methods.py's 6 depths (1.6k tokens), and held/full after prefill;
- `--filler docs`: the same needle in a held-out family whose filler is Python documentation text;
- next-token KL(full || profile) and top-1 agreement on a held-out span of Python's docs: `--prefix`
  tokens prefilled, then `--forced` tokens teacher-forced through Engine.feed, every profile in lockstep
  with full (the same procedure for full). The span is the longest stretch of the calibration text that
  no calibration window touches (window_starts), so no window the search saw is scored.
speed: decode tokens/s of full and kvsharer side by side, alternating, fresh engines each round.
"""

from __future__ import annotations

import kvchat  # noqa: F401  (first: sets GOMP_SPINCOUNT before torch loads, as the CLI does)
import argparse
import dataclasses
import importlib.util
import random
import statistics
import time
from pathlib import Path

import torch

from kvchat.calibration.cache import read_json, write_json
from kvchat.calibration.data import read_text, window_starts
from kvchat.calibration.kvsharer import first_shares
from kvchat.engine import Engine, Request, SamplingParams
from kvchat.engine.probe import make_probe
from kvchat.methods.kvsharer import KVSharer
from kvchat.model import load_model
from kvchat.profiles import Profile

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_methods", HERE / "bench_methods.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def shipped_sharer() -> KVSharer:
    return next(m for m in bench.profile("kvsharer").methods if isinstance(m, KVSharer))


def held_out_span(lm, sharer: KVSharer, n: int) -> tuple[list[int], int]:
    """n token ids of the calibration text clear of every calibration window; -> (ids, offset)."""
    ids = lm.tokenizer(read_text(sharer.data), add_special_tokens=False)["input_ids"]
    taken = sorted(window_starts(len(ids), sharer.samples, sharer.tokens, sharer.seed))
    gaps, end = [], 0
    for s in taken + [len(ids)]:
        gaps.append((s - end, end))
        end = max(end, s + sharer.tokens)
    size, at = max(gaps)
    if size < n:
        raise SystemExit(f"the longest stretch clear of calibration windows is {size} tokens; {n} needed")
    return ids[at : at + n], at


def docs_needles(lm, span: list[int], n_tokens: int, seed: int = 1) -> list[tuple[list[int], int]]:
    """The needle at the 6 depths with held-out documentation text as the filler."""
    tok = lm.tokenizer
    text = tok.decode(span[: n_tokens - 80])
    rng = random.Random(seed)
    out = []
    for d in bench.DEPTHS:
        key = rng.randint(10000, 99999)
        cut = text.rfind("\n", 0, int(len(text) * d)) + 1  # at a line break, not inside a word
        body = text[:cut] + f"The pass key is {key}. Remember it. {key} is the pass key.\n" + text[cut:]
        msgs = [{"role": "user", "content": body + "\n\nWhat is the pass key? Answer with the number only."}]
        out.append((tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False), key))
    return out


def lockstep_kl(lm, profiles: dict[str, Profile], ids: list[int], prefix: int) -> dict[str, tuple[float, float]]:
    """Prefill ids[:prefix], teacher-force the rest; -> {name: (mean KL(full || name), top-1 agreement)}."""
    engines = {"full": Engine(lm, Profile("full")), **{n: Engine(lm, p) for n, p in profiles.items()}}
    seqs = {n: e.start(Request(n, ids[:prefix], SamplingParams(max_new_tokens=1))) for n, e in engines.items()}
    kl = {n: 0.0 for n in profiles}
    agree = {n: 0 for n in profiles}
    steps = len(ids) - prefix - 1
    for t in range(prefix, prefix + steps):
        out = {n: torch.log_softmax(e.feed([seqs[n]], [ids[t]])[0].float(), -1) for n, e in engines.items()}
        ref = out["full"]
        for n in profiles:
            kl[n] += float((ref.exp() * (ref - out[n])).sum())
            agree[n] += int(out[n].argmax() == ref.argmax())
    return {n: (kl[n] / steps, agree[n] / steps) for n in profiles}


def sweep_profiles(lm, layers: list[int], threshold: float | None) -> dict[str, Profile]:
    """A kvsharer profile per s; the largest calibrated for real, the smaller ones its first s shares."""
    base = shipped_sharer()
    if threshold is not None:
        base = dataclasses.replace(base, threshold=threshold)
    top = dataclasses.replace(base, layers=max(layers))
    found = read_json(top.calibrate(make_probe(lm, progress=print)))
    out = {}
    for s in layers:
        m = dataclasses.replace(base, layers=s)
        if s != top.layers and read_json(m.cache_file(lm.desc.name)) is None:
            write_json(m.cache_file(lm.desc.name), {"model": lm.desc.name, "params": m.calib_params(),
                                                    **first_shares(found, s)})
        out[f"s={s}"] = Profile(f"kvsharer-s{s}", methods=[m])
    return out


def report(lm, profiles: dict[str, Profile], a) -> None:
    sharer = shipped_sharer()
    span, at = held_out_span(lm, sharer, a.prefix + a.forced + 1)
    print(f"KL span: {len(span)} tokens at token {at:,} of the calibration text, clear of the "
          f"{sharer.samples} calibration windows (seed {sharer.seed}); prefix {a.prefix}, {a.forced} forced")
    needles = bench.needles(lm, a.tokens)
    fillers = {"grass": needles}
    if a.filler == "docs":
        doc_span, _ = held_out_span(lm, sharer, a.prefix + a.forced + 1 + a.tokens)
        fillers["docs"] = docs_needles(lm, doc_span[a.prefix + a.forced + 1 :], a.tokens)
    found = {}
    for name, prof in profiles.items():
        row = {}
        for fam, prompts in fillers.items():
            r = bench.run_needles(lm, prof, prompts)
            row[fam], row["held"] = r["found"], max(row.get("held", 0), r["held"])
        found[name] = row
        print(f"  needle {name}: " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    kls = lockstep_kl(lm, profiles, span, a.prefix)
    fams = list(fillers)
    print(f"\n| profile | {' | '.join(f'needle ({f})' for f in fams)} | held after prefill | KL vs full | top-1 agree |")
    print("|---|" + "---|" * (len(fams) + 3))
    for name in profiles:
        r, (kl, top1) = found[name], kls[name]
        print(f"| {name} | {' | '.join(f'{r[f]}/6' for f in fams)} | {r['held']:.1%} | {kl:.4f} | {top1:.1%} |")


def speed(lm, a) -> None:
    ids = bench.needle_prompt(lm.tokenizer, a.prompt, 0.5, 12345)
    rates = {"full": [], "kvsharer": []}
    proj = {}
    for r in range(a.rounds):
        order = list(rates) if r % 2 == 0 else list(rates)[::-1]
        for name in order:
            eng = Engine(lm, bench.profile(name))
            seq = eng.start(Request(name, ids, SamplingParams(max_new_tokens=1)))
            before = eng.runner.stats["kv_projections"]
            tok = seq.out[-1] if seq.out else 0
            t = time.perf_counter()
            for _ in range(a.steps):
                tok = int(eng.feed([seq], [tok])[0].argmax())
            rates[name].append(a.steps / (time.perf_counter() - t))
            proj[name] = (eng.runner.stats["kv_projections"] - before) / a.steps
    f, k = statistics.median(rates["full"]), statistics.median(rates["kvsharer"])
    print(f"decode after a {len(ids)}-token prompt, {a.steps} steps x {a.rounds} rounds (median tok/s): "
          f"full {f:.1f}, kvsharer {k:.1f} ({k / f:.2f}x); K/V projections per step: full {proj['full']:.0f}, "
          f"kvsharer {proj['kvsharer']:.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["sweep", "profiles", "speed"])
    ap.add_argument("--layers", default="2,4,6,8,10", help="sweep: shared layers s")
    ap.add_argument("--threshold", type=float, default=None, help="sweep: threshold [the shipped profile's]")
    ap.add_argument("--profiles", default="kvsharer,kvsharer-pyramid,kvsharer-razor,pyramid,razor")
    ap.add_argument("--tokens", type=int, default=1600, help="needle prompt length")
    ap.add_argument("--filler", choices=["grass", "docs"], default="docs", help="docs: also the held-out family")
    ap.add_argument("--prefix", type=int, default=512)
    ap.add_argument("--forced", type=int, default=2048)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    lm = load_model(device="cpu", dtype="float32")
    if a.what == "speed":
        return speed(lm, a)
    if a.what == "sweep":
        profiles = sweep_profiles(lm, [int(s) for s in a.layers.split(",")], a.threshold)
    else:
        profiles = {n: bench.profile(n) for n in a.profiles.split(",")}
    report(lm, profiles, a)


if __name__ == "__main__":
    main()
