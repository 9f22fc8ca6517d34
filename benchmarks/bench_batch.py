"""`kvchat batch` vs HF `generate` with left-padded batches, and what a --max-kv-bytes cap admits.

    python benchmarks/bench_batch.py [--n-prompts 32] [--min-len 300] [--max-len 1500] [--max-new-tokens 32]
                                     [--batch-sizes 1 4 8] [--cap 100MiB] [--cap-slots 8] [--compressed window]

Part 1: the same prompts (chat-templated, lengths uniform in [min-len, max-len] tokens) through kvchat
batch (profile full, continuous batching over --batch-size slots) and through HF `generate` on
left-padded batches of the same size, in input order. Both greedy, fp32, exactly --max-new-tokens tokens
per prompt (EOS off); tokens/s = generated tokens / wall time, prefill included.
Part 2: kvchat batch under one --max-kv-bytes cap with --cap-slots slots, profile full vs --compressed:
how many requests decode at once (peak) and tokens/s.
"""

from __future__ import annotations

import kvchat  # noqa: F401  (first: sets GOMP_SPINCOUNT before torch loads, as the CLI does)
import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvchat.batch import encode_job, run_batch
from kvchat.batch_io import parse_line
from kvchat.loading import quiet_transformers
from kvchat.model import load_model
from kvchat.profiles import load_profile

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
          "A quiet river runs past the old mill, and the miller counts the sacks of flour twice. ")
TEMPLATE_TOKENS = 40  # what the chat template and the question add around the filler, roughly


def make_rows(tok, n: int, lo: int, hi: int) -> list[dict]:
    rng = random.Random(0)
    base = tok(FILLER * (hi // 20 + 20), add_special_tokens=False)["input_ids"]
    rows = []
    for i in range(n):
        k = max(8, rng.randint(lo, hi) - TEMPLATE_TOKENS)
        text = tok.decode(base[i * 3 : i * 3 + k])
        rows.append({"id": f"p{i}", "prompt": f"{text}\n\nWhat colour is the sky in this text?"})
    return rows


def run_kvchat(lm, profile_name: str, rows, new: int, batch_size: int, cap: str | None = None) -> dict:
    opts = {"model": lm.desc.name, "profile": profile_name, "max_new_tokens": new, "temperature": 0.0, "top_p": 1.0,
            "top_k": 0, "seed": None, "system": None, "device": "cpu", "dtype": "float32", "truncate": "error"}
    with tempfile.TemporaryDirectory() as d:
        inp, out = Path(d) / "in.jsonl", Path(d) / "out.jsonl"
        inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        s = run_batch(opts, str(inp), str(out), batch_size=batch_size, max_kv_bytes=cap, progress=False,
                      loaded=(load_profile(profile_name), lm))
    assert s["ok"] == len(rows) and s["completion_tokens"] == new * len(rows), s
    return s


def run_hf(lm, ids: list[list[int]], new: int, batch_size: int) -> float:
    """tokens/s of HF generate over left-padded batches of `batch_size` prompts, in order."""
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    t = time.perf_counter()
    for i in range(0, len(ids), batch_size):
        chunk = ids[i : i + batch_size]
        width = max(map(len, chunk))
        x = torch.tensor([[pad] * (width - len(c)) + c for c in chunk])
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
        with torch.no_grad():
            y = lm.hf.generate(x, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               eos_token_id=None, pad_token_id=pad)
        assert y.shape[1] == width + new
    return len(ids) * new / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-prompts", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=300, help="shortest prompt, tokens")
    ap.add_argument("--max-len", type=int, default=1500, help="longest prompt, tokens")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--cap", default="100MiB", help="--max-kv-bytes for part 2")
    ap.add_argument("--cap-slots", type=int, default=8, help="--batch-size for part 2")
    ap.add_argument("--compressed", default="window", help="the profile compared with full in part 2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-hf", action="store_true", help="only kvchat in part 1")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both sides run in it")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    quiet_transformers()
    lm = load_model(device="cpu", dtype=a.dtype)
    # HF runs on its own copy: kvchat lays its runner's weights out for its batch size.
    hf_lm = None if a.skip_hf else load_model(device="cpu", dtype=a.dtype)
    rows = make_rows(lm.tokenizer, a.n_prompts, a.min_len, a.max_len)
    ids = [encode_job(lm.tokenizer, parse_line(json.dumps(r), i, i + 1), None) for i, r in enumerate(rows)]
    lens = sorted(map(len, ids))
    lm.eos_ids = frozenset()  # exactly --max-new-tokens per prompt on both sides, as HF's min_new_tokens does
    run_kvchat(lm, "full", rows[:1], 2, 1)  # warm up
    if hf_lm is not None:
        run_hf(hf_lm, ids[:1], 2, 1)
    print(f"SmolLM2-135M {a.dtype}, {a.threads} threads; {len(rows)} prompts of {lens[0]}-{lens[-1]} tokens "
          f"(median {lens[len(lens) // 2]}), {a.max_new_tokens} new tokens each, greedy")
    print(f"\n{'batch':>5} | {'kvchat tok/s':>12} {'HF tok/s':>9} {'ratio':>6} | {'kvchat wall s':>13}")
    for bs in a.batch_sizes:
        s = run_kvchat(lm, "full", rows, a.max_new_tokens, bs)
        hf = float("nan") if a.skip_hf else run_hf(hf_lm, ids, a.max_new_tokens, bs)
        print(f"{bs:>5} | {s['tokens_per_s']:>12.2f} {hf:>9.2f} {s['tokens_per_s'] / hf:>6.2f} | {s['wall_s']:>13.1f}",
              flush=True)
    print(f"\nunder --max-kv-bytes {a.cap} with {a.cap_slots} slots:")
    print(f"{'profile':>10} | {'max decoding at once':>20} {'tok/s':>7} | {'peak KV held':>12} {'peak full':>10} {'saved':>6}")
    for prof in ("full", a.compressed):
        s = run_kvchat(lm, prof, rows, a.max_new_tokens, a.cap_slots, cap=a.cap)
        kv = s["kv"]
        print(f"{prof:>10} | {s['max_concurrent']:>20} {s['tokens_per_s']:>7.2f} | "
              f"{kv['peak_bytes_held'] / 2**20:>8.1f} MiB {kv['peak_bytes_full'] / 2**20:>6.1f} MiB {kv['peak_saved']:>6.0%}",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
