"""NVIDIA kvpress's presses on kvchat's generated retrieval tasks, for a side-by-side with bench_quality.py.

Not a dependency of kvchat: run it with a separate environment that has kvpress (it needs
transformers < 5.3) and sees this checkout's `kvchat.quality` on PYTHONPATH (nothing else of kvchat is
imported), e.g.

    python -m venv /tmp/kvpressvenv && /tmp/kvpressvenv/bin/pip install torch==2.13.0
    /tmp/kvpressvenv/bin/pip install kvpress==0.5.5 'transformers<5.3'
    PYTHONPATH=. /tmp/kvpressvenv/bin/python benchmarks/bench_kvpress.py \
        --presses tova,knorm,streaming,snapkv,expected --kept 0.5,0.4,0.35,0.3 \
        --split heldout --lengths 1536,2048 --cases 12

The model is the embedded SmolLM2-135M-Instruct as kvchat converted it (KVCHAT_HOME/models/..., float32,
HF's own forward): nothing is downloaded. The cases are kvchat's (`kvchat.quality.make_case`, the same
seeds and lengths as bench_quality.py plans them), scored by `kvchat.quality.score`. As in kvchat, the
question is inside the compressed prompt: the whole chat-templated prompt is prefilled under the press,
the first token comes from that prefill, then greedy decoding (24 new tokens at most, stop at a newline
or EOS) reads the compressed cache. `--kept 0.35` is a press's compression_ratio 0.65: the share of
the prompt's KV rows each layer keeps (a press holds no block rounding or positions).

One prefill per case serves every press: each layer's hidden states, keys and values are captured and
each press's `compress` runs on them, exactly what its forward hook does (the hook compresses a layer
after its attention ran, so the layers that follow never depend on the press). `--check` compares that
with the presses' own hooks on two cases.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

PRESSES = {  # name -> (class name in kvpress, extra arguments)
    "tova": ("TOVAPress", {}),
    "knorm": ("KnormPress", {}),
    "streaming": ("StreamingLLMPress", {}),
    "snapkv": ("SnapKVPress", {}),
    "expected": ("ExpectedAttentionPress", {}),
    "random": ("RandomPress", {}),
    "keydiff": ("KeyDiffPress", {}),
    "lagkv": ("LagKVPress", {}),
}


def model_dir() -> Path:
    home = Path(os.environ.get("KVCHAT_HOME", Path.home() / ".cache" / "kvchat"))
    d = home / "models" / "smollm2-135m-instruct"
    if not (d / "model.safetensors").exists():
        sys.exit(f"{d} has no converted model: run kvchat once (it converts the embedded GGUF)")
    return d


def load():
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    d = model_dir()
    cfg = AutoConfig.from_pretrained(d)
    if hasattr(cfg, "quantization_config"):  # the GGUF it came from; the safetensors are plain float32
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_pretrained(d, config=cfg, dtype=torch.float32, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(d)


def make_press(name: str, kept: float):
    import kvpress

    cls, extra = PRESSES[name]
    return getattr(kvpress, cls)(compression_ratio=round(1 - kept, 4), **extra)


class Capture:
    """Forward hooks that record each attention layer's inputs and its full keys/values at prefill."""

    def __init__(self, model):
        self.layers = {}
        self.hooks = [layer.self_attn.register_forward_hook(self.hook, with_kwargs=True)
                      for layer in model.model.layers]

    def hook(self, module, args, kwargs, output):
        cache = kwargs["past_key_values"].layers[module.layer_idx]
        kw = {k: v for k, v in kwargs.items() if k != "past_key_values"}
        self.layers[module.layer_idx] = (module, kwargs["hidden_states"], cache.keys, cache.values, kw)

    def remove(self):
        for h in self.hooks:
            h.remove()


@torch.no_grad()
def prefill(model, ids):
    from transformers import DynamicCache

    cache = DynamicCache()
    cap = Capture(model)
    try:
        out = model.model(input_ids=torch.tensor([ids]), past_key_values=cache)
    finally:
        cap.remove()
    logits = model.lm_head(out.last_hidden_state[:, -1])[0]
    return cache, cap.layers, logits


@torch.no_grad()
def compressed(cache, layers, press, model):
    """A copy of the full prefill cache with each layer compressed by `press`, as its hook would."""
    press.post_init_from_model(model)
    c = copy.deepcopy(cache)
    for i, (module, hs, k, v, kw) in layers.items():
        nk, nv = press.compress(module, hs, k, v, None, {**kw, "past_key_values": c})
        c.layers[i].keys, c.layers[i].values = nk, nv
    return c


@torch.no_grad()
def answer(model, tok, cache, logits, T: int, max_new: int = 24) -> str:
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
    out = []
    nxt = int(logits.argmax())
    for i in range(max_new):
        if nxt in eos:
            break
        out.append(nxt)
        text = tok.decode(out, skip_special_tokens=True)
        if "\n" in text or i == max_new - 1:
            break
        o = model(input_ids=torch.tensor([[nxt]]), past_key_values=cache, position_ids=torch.tensor([[T + i]]))
        nxt = int(o.logits[0, -1].argmax())
    return tok.decode(out, skip_special_tokens=True).split("\n")[0]


def plan(tok, split, lengths, cases, tasks, take=None):
    """bench_quality.py's cases; `take`: only the first `take` of each task and length (a subset of the
    same seeds, for a shorter run)."""
    from kvchat.quality import make_case, seeds

    seed_list = seeds(split, cases * len(lengths))
    return [make_case(t, n, seed_list[j * cases + k], tok)
            for j, n in enumerate(lengths) for t in tasks for k in range(min(cases, take or cases))]


def check(model, tok, cases, configs) -> None:
    """The captured compress equals the press's own hooks: same kept rows, same answer."""
    from transformers import DynamicCache

    for case in cases[:2]:
        ids = case.prompt_ids
        cache, layers, logits = prefill(model, ids)
        for name, kept in configs:
            press = make_press(name, kept)
            ours = compressed(cache, layers, press, model)
            theirs = DynamicCache()
            with torch.no_grad(), press(model):
                model.model(input_ids=torch.tensor([ids]), past_key_values=theirs)
            same = all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
                       for a, b in zip(ours.layers, theirs.layers))
            a1 = answer(model, tok, ours, logits, len(ids))
            a2 = answer(model, tok, theirs, logits, len(ids))
            print(f"{name}@{kept}: rows {'same' if same else 'DIFFERENT'}; answers {a1!r} {a2!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presses", default="tova,knorm,streaming,snapkv,expected")
    ap.add_argument("--kept", default="0.5,0.4,0.35,0.3", help="shares of KV rows kept (1 - compression_ratio)")
    ap.add_argument("--split", default="heldout", choices=("heldout", "tuning"))
    ap.add_argument("--lengths", default="1536,2048")
    ap.add_argument("--cases", type=int, default=12, help="cases per task and length")
    ap.add_argument("--take", type=int, default=None, help="only the first TAKE cases of each task and length")
    ap.add_argument("--tasks", default="passkey,reassign")
    ap.add_argument("--cache", default=str(Path(__file__).resolve().parent / ".bench_kvpress.jsonl"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import kvpress
    from kvchat.quality import score

    model, tok = load()
    tasks = a.tasks.split(",")
    cases = plan(tok, a.split, [int(x) for x in a.lengths.split(",")], a.cases, tasks, a.take)
    configs = [(p, float(k)) for p in a.presses.split(",") for k in a.kept.split(",")]
    if a.check:
        return check(model, tok, cases, configs)
    path = Path(a.cache)
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            done[r["key"]] = r
    print(f"kvpress {kvpress.__version__ if hasattr(kvpress, '__version__') else ''}: {len(cases)} cases, "
          f"{a.split} seeds, lengths {a.lengths}, {min(len(c.prompt_ids) for c in cases)}-"
          f"{max(len(c.prompt_ids) for c in cases)} tokens", flush=True)
    with path.open("a") as out:
        for i, case in enumerate(cases):
            keys = {(p, k): f"{p}|{k}|{case.task}|{case.seed}|{case.n_tokens}" for p, k in configs}
            todo = [c for c in configs if keys[c] not in done]
            if not todo:
                continue
            t = time.perf_counter()
            cache, layers, logits = prefill(model, case.prompt_ids)
            for p, k in todo:
                text = answer(model, tok, compressed(cache, layers, make_press(p, k), model), logits,
                              len(case.prompt_ids))
                r = {"key": keys[(p, k)], "press": p, "kept": k, "task": case.task, "seed": case.seed,
                     "length": case.n_tokens, "tokens": len(case.prompt_ids), "filler": case.filler,
                     "phrasing": case.phrasing, "text": text, "correct": score(case, text)}
                done[r["key"]] = r
                out.write(json.dumps(r) + "\n")
                out.flush()
                if a.verbose:
                    print(f"  {p}@{k} {case.task} {case.seed} {case.filler} {'ok ' if r['correct'] else 'BAD'} "
                          f"{text[:50]!r}", file=sys.stderr, flush=True)
            print(f"case {i + 1}/{len(cases)} ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
    print("| press | kept | " + " | ".join(tasks) + " | found |")
    print("|---|---|" + "---|" * len(tasks) + "---|")
    for p, k in configs:
        rows = [done[f"{p}|{k}|{c.task}|{c.seed}|{c.n_tokens}"] for c in cases]
        per = [f"{sum(r['correct'] for r in rows if r['task'] == t)}/{sum(r['task'] == t for r in rows)}"
               for t in tasks]
        print(f"| {p} | {k:.0%} | " + " | ".join(per) + f" | {sum(r['correct'] for r in rows)}/{len(rows)} |")


if __name__ == "__main__":
    main()
