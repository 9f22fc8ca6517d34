"""kvchat `full` vs HF `generate` on the embedded model: prefill time and decode tokens/s, side by side.

    python benchmarks/bench_generate.py [--lengths 512 2048] [--batches 1 4] [--new 32] [--profile full]

Both run greedy, in the same dtype (--dtype, default float32), on the same prompts in the same process; ratios are kvchat / HF (higher = faster
for tokens/s, lower = faster for prefill). HF's prefill and decode are split by a logits processor that
notes when generate asks for each token: decode tokens/s = B * (new - 1) / (last call - first call).
"""

from __future__ import annotations

import kvchat  # noqa: F401  (first: sets GOMP_SPINCOUNT before torch loads, as the CLI does)
import argparse
import time

import torch

from kvchat.loading import quiet_transformers
from kvchat.engine import Engine, Request, SamplingParams
from kvchat.cache.usage import saved as kv_saved
from kvchat.model import load_model
from kvchat.profiles import load_profile

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
          "A quiet river runs past the old mill, and the miller counts the sacks of flour twice. ")


def prompts(tok, n_tokens: int, batch: int) -> list[list[int]]:
    base = tok(FILLER * (n_tokens // 20 + 10), add_special_tokens=False)["input_ids"]
    return [base[i * 7 : i * 7 + n_tokens] for i in range(batch)]


class _Clock:
    """A logits processor that notes when generate asks for each token's scores: the first call comes
    right after prefill, so one generate call gives both prefill time and decode rate."""

    def __init__(self):
        self.calls = []

    def __call__(self, input_ids, scores):
        self.calls.append(time.perf_counter())
        return scores


def bench_hf(lm, batch_ids, new: int) -> tuple[float, float]:
    from transformers import LogitsProcessorList

    x = torch.tensor(batch_ids)
    clock = _Clock()
    with torch.no_grad():
        t = time.perf_counter()
        lm.hf.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                       pad_token_id=0, attention_mask=torch.ones_like(x), logits_processor=LogitsProcessorList([clock]))
    prefill = clock.calls[0] - t
    return prefill, len(batch_ids) * (len(clock.calls) - 1) / (clock.calls[-1] - clock.calls[0])


def bench_kvchat(lm, profile, batch_ids, new: int) -> tuple[float, float, float]:
    eng = Engine(lm, profile, max_slots=len(batch_ids))
    eos = lm.eos_ids
    lm.eos_ids = frozenset()  # generate exactly `new` tokens, as HF does with min_new_tokens
    try:
        t = time.perf_counter()
        seqs = [eng.start(Request(str(i), ids, SamplingParams(max_new_tokens=new))) for i, ids in enumerate(batch_ids)]
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        steps = 0
        while not all(s.finish for s in seqs):
            eng.step([s for s in seqs if not s.finish])
            steps += 1
        decode = time.perf_counter() - t
        use = [eng.usage(s.slot) for s in seqs]
        saved = kv_saved(sum(u.held for u in use), sum(u.full for u in use))
    finally:
        lm.eos_ids = eos
    return prefill, len(batch_ids) * steps / decode, saved


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--new", type=int, default=32, help="tokens generated per sequence")
    ap.add_argument("--profile", default="full")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both sides run in it")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    quiet_transformers()
    # Two copies: kvchat lays its runner's weights out for its batch size, HF keeps its own layout.
    lm = load_model(device="cpu", dtype=a.dtype)
    hf_lm = load_model(device="cpu", dtype=a.dtype)
    profile = load_profile(a.profile)
    warm = prompts(lm.tokenizer, 64, 1)
    bench_hf(hf_lm, warm, 4), bench_kvchat(lm, profile, warm, 4)
    print(f"SmolLM2-135M {a.dtype}, {a.threads} threads, {a.new} new tokens; kvchat profile {a.profile}")
    hdr = f"{'prompt':>6} {'batch':>5} | {'HF prefill s':>12} {'kvchat prefill s':>16} {'ratio':>6} | " \
          f"{'HF tok/s':>8} {'kvchat tok/s':>12} {'ratio':>6} | {'KV saved':>8}"
    print(hdr)
    print("-" * len(hdr))
    for n in a.lengths:
        for b in a.batches:
            ids = prompts(lm.tokenizer, n, b)
            hf_pre, hf_tps = bench_hf(hf_lm, ids, a.new)
            kv_pre, kv_tps, saved = bench_kvchat(lm, profile, ids, a.new)
            print(f"{n:>6} {b:>5} | {hf_pre:>12.2f} {kv_pre:>16.2f} {kv_pre / hf_pre:>6.2f} | "
                  f"{hf_tps:>8.1f} {kv_tps:>12.1f} {kv_tps / hf_tps:>6.2f} | {saved:>8.1%}", flush=True)


if __name__ == "__main__":
    main()
