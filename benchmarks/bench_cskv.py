"""CSKV on the embedded model: the density sweep, and decode speed against full.

    KVCHAT_HOME=/tmp/kvhome python benchmarks/bench_cskv.py sweep [--densities 0.25,0.5,0.75]
        [--pairs 0.5:0.5,0.5:0.25] [--bits 0,4] [--group 16] [--qgroup 32] [--train-steps 0,40] [--sink 4] [--text /usr/share/common-licenses/GPL-3] [--prefill 1536] [--forced 512]
    KVCHAT_HOME=/tmp/kvhome python benchmarks/bench_cskv.py speed [--tokens 2048] [--steps 48]

sweep: for every (k_density, v_density, train_steps): pass keys found on bench_methods' 6 needle depths
(1.6k-token prompts), held / full bytes at the end of their prefill (max over the 6), and on a real text
the factors were not calibrated on (default: the GPL-3 licence text, Python's docs being the calibration
text) the mean next-token KL(full || cskv) and top-1 agreement over `forced` teacher-forced decode steps
through Engine.feed after prefilling the first `prefill` tokens (full runs the same steps once).
speed: decode tokens/s of full and cskv on one 2,048-token prompt, timed in alternating rounds in one
run (the machine is shared: the ratio is the figure).
"""

from __future__ import annotations

import kvchat  # noqa: F401  (first: sets GOMP_SPINCOUNT before torch loads, as the CLI does)
import argparse
import itertools
import time

import torch

from bench_methods import DEPTHS, needle_prompt, needles, profile
from kvchat.engine import Engine, Request, SamplingParams
from kvchat.methods.cskv import CSKV
from kvchat.model import load_model
from kvchat.profiles import Profile


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


def sweep(lm, a) -> None:
    ids = lm.tokenizer(open(a.text).read(), add_special_tokens=False)["input_ids"][: a.prefill + a.forced + 1]
    prompts = needles(lm, a.tokens)
    print(f"text: {a.text}, {len(ids)} tokens (prefill {a.prefill}, {len(ids) - 1 - a.prefill} forced steps); "
          f"needle: 6 prompts of {min(len(p) for p, _ in prompts)}-{max(len(p) for p, _ in prompts)} tokens, "
          f"depths {', '.join(f'{d:.0%}' for d in DEPTHS)}", flush=True)
    ref, _ = forced_logprobs(lm, [], ids, a.prefill)
    dens = [float(x) for x in a.densities.split(",")]
    steps = [int(x) for x in a.train_steps.split(",")]
    print(f"{'k_dens':>6} {'v_dens':>6} {'steps':>5} {'bits':>4} {'sink':>4} {'needle':>6} {'held':>6} {'KL':>8} {'top1':>6} "
          f"{'held@text':>9}", flush=True)
    pairs = ([tuple(float(x) for x in p.split(":")) for p in a.pairs.split(",")] if a.pairs
             else list(itertools.product(dens, dens)))
    for (kd, vd), st, bits in itertools.product(pairs, steps, [int(b) for b in a.bits.split(",")]):
        make = lambda: [CSKV(k_density=kd, v_density=vd, train_steps=st, sink=a.sink, bits=bits,  # noqa: E731
                             group=a.group, qgroup=a.qgroup)]
        Engine(lm, Profile("c", methods=make()))  # calibrates once (cached) before anything is timed
        found, held = found_needles(lm, make, prompts)
        lp, held_text = forced_logprobs(lm, make(), ids, a.prefill)
        kl = (ref.exp() * (ref - lp)).sum(-1).mean().item()
        top1 = (ref.argmax(-1) == lp.argmax(-1)).float().mean().item()
        print(f"{kd:>6} {vd:>6} {st:>5} {bits:>4} {a.sink:>4} {found:>4}/6 {held:>6.1%} {kl:>8.4f} {top1:>6.1%} {held_text:>9.1%}",
              flush=True)


def speed(lm, a) -> None:
    ids = needle_prompt(lm.tokenizer, a.tokens, 0.5, 12345)
    runs = {}
    for name, methods in (("full", []), ("cskv", profile("cskv").methods)):
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
          f"full {tps['full']:.2f} tok/s, cskv {tps['cskv']:.2f} tok/s ({tps['cskv'] / tps['full']:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["sweep", "speed"])
    ap.add_argument("--densities", default="0.25,0.5,0.75")
    ap.add_argument("--train-steps", default="0")
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--pairs", default=None, help="k:v density pairs instead of every pair of --densities, e.g. 0.5:0.5,0.5:0.25")
    ap.add_argument("--bits", default="0", help="feature quantization: 0 (none), 2 or 4; a list sweeps")
    ap.add_argument("--group", type=int, default=16, help="tokens sealed together (and sharing key scales with --bits)")
    ap.add_argument("--qgroup", type=int, default=32, help="value feature channels sharing a scale (--bits)")
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--prefill", type=int, default=1536)
    ap.add_argument("--forced", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=None, help="needle prompt tokens (sweep, 1600) / speed prompt (2048)")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    lm = load_model(device="cpu", dtype=a.dtype)
    if a.what == "sweep":
        a.tokens = a.tokens or 1600
        sweep(lm, a)
    else:
        a.tokens = a.tokens or 2048
        speed(lm, a)


if __name__ == "__main__":
    main()
