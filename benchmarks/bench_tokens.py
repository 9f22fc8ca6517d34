"""Greedy tokens of the needle prompts under every profile: does a change to the loop change any output?

    python benchmarks/bench_tokens.py OUT.json [--profiles full,window,...] [--dtype float32] [--new 40]
    python benchmarks/bench_tokens.py OUT.json --compare BEFORE.json

Runs bench_methods' six 1.6k-token needle prompts through each profile (this checkout's profiles/),
one slot at a time and then three slots decoding together, and writes the generated token ids. Run it
on the commit before a speed change and on the change: with --compare it prints, per profile, whether
every token is the same. float32 by default: a faster loop must give the same tokens there.
"""

from __future__ import annotations

import kvchat  # noqa: F401  (first: sets GOMP_SPINCOUNT before torch loads, as the CLI does)
import argparse
import json
import sys
from pathlib import Path

from bench_methods import needles, profile
from kvchat.engine import Engine, Request, SamplingParams
from kvchat.loading import quiet_transformers
from kvchat.model import load_model

PROFILES = "full,window,pyramid,razor,d2o,kivi4,kv8,cskv,kvsharer,razor-kivi4,kivi2"


def run(lm, name: str, prompts, new: int) -> dict[str, list[list[int]]]:
    prof = profile(name)
    alone = [Engine(lm, prof).generate(ids, SamplingParams(max_new_tokens=new)).token_ids for ids, _ in prompts]
    eng = Engine(lm, prof, max_slots=3)
    reqs = [Request(str(i), ids, SamplingParams(max_new_tokens=new)) for i, (ids, _) in enumerate(prompts)]
    together = [r.token_ids for r in sorted(eng.run(reqs), key=lambda r: int(r.id))]
    return {name: alone, f"{name}@3 slots": together}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--profiles", default=PROFILES)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--new", type=int, default=40)
    ap.add_argument("--compare", help="an earlier OUT.json")
    a = ap.parse_args()
    quiet_transformers()
    lm = load_model(device="cpu", dtype=a.dtype)
    prompts = needles(lm, 1600)
    before = json.loads(Path(a.compare).read_text()) if a.compare else None
    res, same = {}, True
    for name in a.profiles.split(","):
        for key, toks in run(lm, name, prompts, a.new).items():
            res[key] = toks
            line = f"{key:>24}: {sum(str(k) in lm.tokenizer.decode(t) for t, (_, k) in zip(toks, prompts))}/6 needles"
            if before is not None:
                eq = before.get(key) == toks
                same &= eq
                line += "  same tokens" if eq else f"  DIFFERENT ({sum(x != y for x, y in zip(before.get(key, []), toks))} prompts)"
            print(line, flush=True)
        Path(a.out).write_text(json.dumps(res))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
