"""Needle, savings and timing for the eviction profiles on the embedded model.

    KVCHAT_HOME=/tmp/kvhome python benchmarks/bench_methods.py [--profiles full,pyramid,razor,d2o]
        [--tokens 1600] [--decode 256] [--timing-tokens 2000]

Prints, per profile: pass keys found out of 6 depths, held / full KV bytes at the end of prefill, prefill
time; then held bytes during 256 forced decode steps (EOS ignored), and full vs pyramid prefill time on a
2,000-token prompt. Profiles load from this checkout's profiles/ so it runs before and after a merge.
"""

from __future__ import annotations

import kvchat  # noqa: F401  (first: sets GOMP_SPINCOUNT before torch loads, as the CLI does)
import argparse
import random
import time
from pathlib import Path

import torch

from kvchat.engine import Engine, Request, SamplingParams
from kvchat.model import load_model
from kvchat.profiles import load_profile
from kvchat.templating import prompt_ids

PROFILES = Path(__file__).resolve().parents[1] / "profiles"
DEPTHS = (0.05, 0.2, 0.4, 0.6, 0.8, 0.95)
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


def profile(name: str):
    return load_profile(str(PROFILES / f"{name}.yaml"))


def needle_prompt(tok, n_tokens: int, depth: float, key: int) -> list[int]:
    """Chat-formatted prompt of ~n_tokens: filler with the pass key at `depth`, the question at the end."""
    per = len(tok(FILLER)["input_ids"])
    n_fill = max(1, (n_tokens - 80) // per)
    at = int(n_fill * depth)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    text = FILLER * at + needle + FILLER * (n_fill - at)
    # The 135M model answers a bare question after the text; a long preamble makes it ramble instead.
    content = text + "\n\nWhat is the pass key? Answer with the number only."
    return prompt_ids(tok, [{"role": "user", "content": content}])


def needles(lm, n_tokens: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [(needle_prompt(lm.tokenizer, n_tokens, d, k), k) for d, k in
            ((d, rng.randint(10000, 99999)) for d in DEPTHS)]


def run_needles(lm, name, prompts) -> dict:
    """`name`: a profile in profiles/, or a Profile."""
    prof = profile(name) if isinstance(name, str) else name
    found, ratios, times = 0, [], []
    for ids, key in prompts:
        eng = Engine(lm, prof)
        t = time.perf_counter()
        seq = eng.start(Request("n", ids, SamplingParams(max_new_tokens=1)))
        times.append(time.perf_counter() - t)
        use = eng.usage(seq.slot)
        ratios.append(use.held / use.full)
        if not seq.out:  # the first token was EOS: an empty answer
            continue
        # Prefill ended with one sampled token; keep decoding it to 12 tokens.
        seq.finish, seq.last, seq.req.params.max_new_tokens = None, seq.out[-1], 12
        while seq.finish is None and seq.last is not None:
            eng.step([seq])
        found += str(key) in seq.text
    return {"found": found, "held": max(ratios), "prefill_s": sum(times) / len(times)}


def forced_decode(lm, name: str, ids: list[int], steps: int, every: int = 64, engines=None) -> list[tuple[int, int, int]]:
    """Held and full bytes every `every` steps of greedy decode with EOS ignored (the engine is appended
    to `engines` when given)."""
    eng = Engine(lm, profile(name))
    if engines is not None:
        engines.append(eng)
    seq = eng.start(Request("d", ids, SamplingParams(max_new_tokens=1)))
    marks = [(0, eng.usage(0).held, eng.usage(0).full)]
    tok = int(seq.out[-1]) if seq.out else lm.tokenizer.eos_token_id
    for i in range(1, steps + 1):
        tok = int(eng.feed([seq], [tok])[0].argmax())
        if i % every == 0:
            marks.append((i, eng.usage(0).held, eng.usage(0).full))
    return marks


def prefill_time(lm, name: str, ids: list[int], repeat: int = 2) -> float:
    best = float("inf")
    for _ in range(repeat):
        eng = Engine(lm, profile(name))
        seq = eng.start(Request("t", ids, SamplingParams(max_new_tokens=1)))
        best = min(best, seq.t_prefill)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default="full,pyramid,razor,d2o")
    ap.add_argument("--tokens", type=int, default=1600)
    ap.add_argument("--decode", type=int, default=256)
    ap.add_argument("--timing-tokens", type=int, default=2000)
    ap.add_argument("--skip-needles", action="store_true")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    lm = load_model(device="cpu", dtype="float32")
    names = a.profiles.split(",")
    prompts = needles(lm, a.tokens)
    print(f"needle: {len(prompts)} prompts of {min(len(p) for p, _ in prompts)}-{max(len(p) for p, _ in prompts)} tokens, "
          f"depths {', '.join(f'{d:.0%}' for d in DEPTHS)}")
    print(f"{'profile':8} {'found':>6} {'held/full':>10} {'prefill_s':>10}")
    for n in ([] if a.skip_needles else names):
        r = run_needles(lm, n, prompts)
        print(f"{n:8} {r['found']:>4}/6 {r['held']:>10.1%} {r['prefill_s']:>10.2f}", flush=True)
    if a.decode:
        for n in (x for x in names if x != "full"):
            marks = forced_decode(lm, n, prompts[2][0], a.decode)
            print(f"decode {n}: " + "  ".join(f"step {i}: {h / 2**20:.2f}/{f / 2**20:.2f} MiB ({h / f:.1%})" for i, h, f in marks), flush=True)
    if a.timing_tokens and "pyramid" in names:
        ids = needle_prompt(lm.tokenizer, a.timing_tokens, 0.5, 12345)
        full, pyr = prefill_time(lm, "full", ids), prefill_time(lm, "pyramid", ids)
        print(f"prefill {len(ids)} tokens: full {full:.2f} s, pyramid {pyr:.2f} s ({pyr / full:.0%} of full)")


if __name__ == "__main__":
    main()
