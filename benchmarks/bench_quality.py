"""Retrieval accuracy against KV held for eviction policies, on kvchat's generated tasks (issue 15).

    python benchmarks/bench_quality.py -c full -c pyramid -c 'pyramidinfer:{"carry": 0}' \
        --split heldout --lengths 1536,2048 --cases 12 [--tasks passkey,reassign] [--cache FILE]

Each `-c` is a shipped profile name, a YAML path, or inline methods `key:{json}` joined by `+`
(`razor:{"recent": 96}+half:{}`). Every config answers the same cases: for length j and case k, seed
j x cases + k of the split (as `kvchat eval` plans them), so `--cases 12` at two lengths is 24 cases per
task, every filler and phrasing at each length. A case is answered greedily (24 new tokens, stop at a
newline) and scored with kvchat.quality.score. Held is KV held / full after the prompt's prefill.

Results are appended to `--cache` (JSONL) keyed by config, case and a hash of kvchat/methods and
kvchat/calibration, so an interrupted sweep resumes and a code change re-runs. Prints one row per
config: held share, found per task, and found relative to `full` when `full` is among the configs.
"""

from __future__ import annotations

import kvchat  # noqa: F401  (first: sets GOMP_SPINCOUNT before torch loads, as the CLI does)
import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "profiles"


def code_hash(prof=None) -> str:
    """What a config's answers depend on: the engine, the store, calibrations, the method interface and
    the files of the config's own methods (editing one method does not re-run the others)."""
    h = hashlib.sha1()
    files = [p for d in ("kvchat/engine", "kvchat/cache", "kvchat/calibration") for p in sorted((ROOT / d).glob("*.py"))]
    files.append(ROOT / "kvchat/methods/base.py")
    if prof is not None:
        import inspect

        files += sorted({Path(inspect.getfile(type(m))) for m in prof.methods})
    for p in files:
        h.update(p.read_bytes())
    return h.hexdigest()[:10]


def load_config(spec: str):
    """A shipped name, a YAML path, or `key:{json}+key:{json}`."""
    from kvchat.profiles import load_profile, parse_profile

    if (PROFILES / f"{spec}.yaml").exists():
        return load_profile(str(PROFILES / f"{spec}.yaml"))
    if spec.endswith((".yaml", ".yml")):
        return load_profile(spec)
    methods = []
    for part in spec.split("+"):
        key, _, params = part.partition(":")
        methods.append({key.strip(): json.loads(params) if params.strip() else {}})
    return parse_profile({"name": spec, "methods": methods}, spec)


def plan(tokenizer, split: str, lengths, cases: int, tasks, offset: int = 0):
    from kvchat.quality import make_case, seeds

    seed_list = seeds(split, cases * len(lengths), offset)
    return [make_case(t, n, seed_list[j * cases + k], tokenizer)
            for j, n in enumerate(lengths) for t in tasks for k in range(cases)]


def make_fan(children):
    """One prefill for several policies whose prefill hooks only record (razor, d2o, tova: none of them
    drops hidden states or compacts before `after_prefill`): every child sees the same layer contexts,
    then each gets its own copy of the store for `after_prefill` and decode. `--check` compares this
    with separate engines."""
    from dataclasses import dataclass

    from kvchat.methods.base import Method

    @dataclass
    class Fan(Method):
        name = "fan"

        def bind(self, desc, probe=None):
            super().bind(desc, probe)  # the children were bound by their own engines

        def needs_bias(self):
            return any(c.needs_bias() for c in children)

        def prefill_rows(self, layer):
            return max(c.prefill_rows(layer) for c in children)

        def on_append(self, layer, slots, n):
            for c in children:
                c.on_append(layer, slots, n)

        def after_prefill_layer(self, ctx):
            for c in children:
                if c.after_prefill_layer(ctx) is not None:
                    raise RuntimeError(f"{c.name} dropped hidden states at prefill: it cannot be fanned")
            return None

    return Fan()


def fannable(prof) -> bool:
    from kvchat.methods.d2o import D2O
    from kvchat.methods.razor import RazorAttention

    fan_types = (D2O, RazorAttention) + tuple(c for c in _extra_fan_types())
    return len(prof.methods) == 1 and isinstance(prof.methods[0], fan_types)


def _extra_fan_types():
    try:
        from kvchat.methods.tova import TOVA
        return (TOVA,)
    except ImportError:
        return ()


def run_fanned(lm, specs, cases, cache: dict, out, tags: dict, verbose: bool) -> None:
    """Answer every case under every spec in `specs` (all fannable, all with the same needs_bias)."""
    import copy

    from kvchat.engine import Engine, Request, SamplingParams
    from kvchat.engine.forward import Runner
    from kvchat.engine.seq import Seq
    from kvchat.profiles import Profile
    from kvchat.quality.scoring import score

    runner = Runner(lm, [])
    engines = {s: Engine(lm, load_config(s), runner=runner) for s in specs}
    for case in cases:
        todo = [s for s in specs if f"{tags[s]}|{s}|{case.task}|{case.seed}|{case.n_tokens}" not in cache]
        if not todo:
            continue
        fan = make_fan([engines[s].methods[0] for s in todo])
        runner.methods = [fan]
        base = Engine(lm, Profile("fan", methods=[fan]), runner=runner)
        params = SamplingParams(max_new_tokens=24, stop=("\n",))
        req = Request("c", case.prompt_ids, params)
        seq0 = Seq(req=req, slot=0, gen=params.generator())
        t = time.perf_counter()
        logits = base.prefill(seq0, case.prompt_ids)
        t_prefill = time.perf_counter() - t
        base.store.listeners = []
        for s in todo:
            eng, m = engines[s], engines[s].methods[0]
            runner.methods = [m]
            st = copy.deepcopy(base.store)
            st.listeners = [m]
            eng.store = st
            m.after_prefill(st, 0)
            st.seal([0])
            st.note([0])
            st.trim()
            seq = Seq(req=req, slot=0, pos=len(case.prompt_ids), gen=params.generator(), t_prefill=t_prefill)
            seq.prefilled = len(case.prompt_ids)
            after = eng.usage(0)
            t = time.perf_counter()
            eng._accept(seq, logits.clone(), None)
            while not seq.finish:
                eng.step([seq])
            end = eng.usage(0)
            r = {"task": case.task, "seed": case.seed, "tokens": len(case.prompt_ids), "length": case.n_tokens,
                 "filler": case.filler, "phrasing": case.phrasing, "depths": list(case.depths),
                 "expected": case.answer, "distractors": list(case.distractors), "text": seq.text,
                 "correct": score(case, seq.text), "held_prefill": round(after.held / after.full, 4),
                 "held_end": round(end.held / end.full, 4), "prefill_s": round(t_prefill, 3),
                 "generated": len(seq.out), "decode_s": round(time.perf_counter() - t, 3)}
            st.free_slot(0)
            record(cache, out, f"{tags[s]}|{s}|{case.task}|{case.seed}|{case.n_tokens}", r, s, case, verbose)


def record(cache: dict, out, key: str, r: dict, spec: str, case, verbose: bool) -> None:
    """One answered case: into the cache, appended to the cache file (so an interrupted sweep resumes),
    and with -v a line on stderr."""
    cache[key] = r
    if out is not None:
        out.write(json.dumps({"key": key, **r}) + "\n")
        out.flush()
    if verbose:
        print(f"  {spec[:40]:40} {case.task:8} {case.seed:5} {case.filler:9} p{case.phrasing} "
              f"{'ok ' if r['correct'] else 'BAD'} held {r['held_prefill']:.3f} {r['text'][:50]!r}",
              file=sys.stderr, flush=True)


def run_config(lm, spec: str, cases, cache: dict, out, tag: str, verbose: bool) -> list[dict]:
    from kvchat.engine import Engine
    from kvchat.quality.evaluate import run_case

    engine, rows = None, []
    for case in cases:
        key = f"{tag}|{spec}|{case.task}|{case.seed}|{case.n_tokens}"
        if key not in cache:
            engine = engine or Engine(lm, load_config(spec))
            record(cache, out, key, run_case(engine, case, 24), spec, case, verbose)
        rows.append(cache[key])
    return rows


def summary(spec: str, rows: list[dict], tasks, full_found: int | None) -> str:
    held = sum(r["held_prefill"] for r in rows) / len(rows)
    per = [f"{sum(r['correct'] for r in rows if r['task'] == t)}/{sum(r['task'] == t for r in rows)}" for t in tasks]
    found = sum(r["correct"] for r in rows)
    rel = f"{found / full_found:.0%}" if full_found else "-"
    return f"| {spec} | {held:.1%} | " + " | ".join(per) + f" | {found}/{len(rows)} | {rel} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--config", action="append", required=True)
    ap.add_argument("--split", default="heldout", choices=("heldout", "tuning"))
    ap.add_argument("--lengths", default="1536,2048")
    ap.add_argument("--cases", type=int, default=12, help="cases per task and length")
    ap.add_argument("--offset", type=int, default=0, help="first seed of the split to use")
    ap.add_argument("--tasks", default="passkey,reassign")
    ap.add_argument("--cache", default=str(ROOT / "benchmarks" / ".bench_quality.jsonl"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--no-fan", action="store_true", help="one engine per config, no shared prefill")
    ap.add_argument("--check", action="store_true", help="fanned and separate runs must agree (first 2 cases)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    from kvchat.loading import quiet_transformers
    from kvchat.model import load_model

    quiet_transformers()
    lm = load_model(device="cpu", dtype="float32")
    lengths = [int(x) for x in a.lengths.split(",")]
    tasks = a.tasks.split(",")
    cases = plan(lm.tokenizer, a.split, lengths, a.cases, tasks, a.offset)
    cache, path = {}, Path(a.cache)
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                cache[r.pop("key")] = r
    tags = {s: code_hash(load_config(s)) for s in a.config}
    seeds = sorted({c.seed for c in cases})
    print(f"{len(cases)} cases: {a.split} seeds {seeds[0]}-{seeds[-1]}, lengths {a.lengths}, "
          f"{min(len(c.prompt_ids) for c in cases)}-{max(len(c.prompt_ids) for c in cases)} tokens, code {code_hash()}")
    print("| config | held | " + " | ".join(tasks) + " | found | vs full |")
    print("|---|---|" + "---|" * len(tasks) + "---|---|")
    full_found = None
    if a.check:
        cases = cases[:2]
        fan_cache: dict = {}
        for bias in (False, True):
            group = [s for s in a.config if load_config(s).methods[0].needs_bias() == bias]
            if group:
                run_fanned(lm, group, cases, fan_cache, None, {s: "fan" for s in group}, False)
        for spec in a.config:
            solo = run_config(lm, spec, cases, {}, None, "solo", False)
            fanned = [fan_cache[f"fan|{spec}|{c.task}|{c.seed}|{c.n_tokens}"] for c in cases]
            for x, y in zip(solo, fanned):
                same = x["text"] == y["text"] and x["held_prefill"] == y["held_prefill"] and x["held_end"] == y["held_end"]
                print(f"{spec}: {'same' if same else 'DIFFERENT'} {x['text']!r} {y['text']!r} "
                      f"{x['held_prefill']} {y['held_prefill']} {x['held_end']} {y['held_end']}")
        return
    with path.open("a") as out:
        if not a.no_fan:
            profs = {s: load_config(s) for s in a.config}
            groups: dict = {}
            for s, p in profs.items():
                if fannable(p):
                    groups.setdefault(p.methods[0].needs_bias(), []).append(s)
            for specs in groups.values():
                if len(specs) > 1:
                    run_fanned(lm, specs, cases, cache, out, tags, a.verbose)
        for spec in a.config:
            t = time.perf_counter()
            rows = run_config(lm, spec, cases, cache, out, tags[spec], a.verbose)
            if spec == "full":
                full_found = sum(r["correct"] for r in rows)
            print(summary(spec, rows, tasks, full_found) + f"  ({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
