"""`kvchat eval`: every profile over the same generated retrieval cases and the same fidelity text.

Per profile one engine (one slot): the retrieval prompts are answered greedily and scored, then the
fidelity text is teacher-forced (see fidelity.py). `full`'s fidelity run is the reference, done first.
Ctrl-C ends the run with the profiles that finished.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field

from kvchat.engine import Engine, Request, SamplingParams
from kvchat.errors import KvchatError
from kvchat.quality import fidelity
from kvchat.quality.scoring import score
from kvchat.quality.tasks import DEFAULT_TASKS, TASKS, make_case, seeds


MIN_LENGTH = 256  # the facts, the question and the template take ~150 tokens


@dataclass
class Settings:
    lengths: tuple[int, ...] = (1024, 2048)
    tasks: tuple[str, ...] = DEFAULT_TASKS
    cases: int = 1  # per task and length
    split: str = "heldout"
    prefix: int = 1024  # fidelity: tokens prefilled under the profile
    scored: int = 128  # fidelity: tokens then forced one decode step at a time (0: no fidelity)
    text: str | None = None  # fidelity text file; None: Python's documentation
    max_new_tokens: int = 24  # a retrieval answer is a short sentence with one number


def plan(tokenizer, s: Settings):
    """The cases every profile answers: for length j and case k, seed j * cases + k of the split (every
    task uses the same seeds; the filler rotates with the task)."""
    seed_list = seeds(s.split, s.cases * len(s.lengths))
    return [make_case(task, n, seed_list[j * s.cases + k], tokenizer)
            for j, n in enumerate(s.lengths) for task in s.tasks for k in range(s.cases)]


def run_case(engine: Engine, case, max_new_tokens: int) -> dict:
    params = SamplingParams(max_new_tokens=max_new_tokens, stop=("\n",))
    seq = engine.start(Request(f"{case.task}-{case.seed}", case.prompt_ids, params))
    after = engine.usage(seq.slot)
    t = time.perf_counter()
    while not seq.finish:
        engine.step([seq])
    decode_s = time.perf_counter() - t
    end = engine.usage(seq.slot)
    engine.release(seq)
    return {"task": case.task, "seed": case.seed, "tokens": len(case.prompt_ids), "length": case.n_tokens,
            "filler": case.filler, "phrasing": case.phrasing, "depths": list(case.depths),
            "expected": case.answer, "distractors": list(case.distractors), "text": seq.text,
            "correct": score(case, seq.text), "held_prefill": round(after.held / after.full, 4),
            "held_end": round(end.held / end.full, 4), "prefill_s": round(seq.t_prefill, 3),
            "generated": len(seq.out), "decode_s": round(decode_s, 3)}


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def summarize(name: str, summary: str, cases: list[dict], fid: dict | None, s: Settings, seconds: float) -> dict:
    """A profile's row: accuracy per task (and per length), held shares, fidelity, speed."""
    acc = {t: _mean(c["correct"] for c in cases if c["task"] == t) for t in s.tasks}
    by_len = {str(n): {t: _mean(c["correct"] for c in cases if c["task"] == t and c["length"] == n)
                       for t in s.tasks} for n in s.lengths}
    gen = sum(c["generated"] for c in cases)
    dec = sum(c["decode_s"] for c in cases)
    return {
        "profile": name, "summary": summary, "accuracy": acc, "accuracy_mean": _mean(c["correct"] for c in cases),
        "accuracy_by_length": by_len, "held_prefill": _mean(c["held_prefill"] for c in cases),
        "held_end": fid["held_end"] if fid else _mean(c["held_end"] for c in cases),
        "kl": fid["kl"] if fid else None, "top1": fid["top1"] if fid else None, "ppl": fid["ppl"] if fid else None,
        "prefill_s": {str(n): _mean(c["prefill_s"] for c in cases if c["length"] == n) for n in s.lengths},
        "decode_tok_s": fid["decode_tok_s"] if fid else (round(gen / dec, 2) if dec else None),
        "fidelity": fid, "seconds": round(seconds, 1), "cases": cases,
    }


@dataclass
class Run:
    settings: Settings
    model: str
    rows: list[dict] = field(default_factory=list)
    reference: dict | None = None
    interrupted: bool = False
    wall_s: float = 0.0

    def record(self) -> dict:
        s = asdict(self.settings)
        s["text"] = s["text"] or fidelity.DEFAULT_TEXT
        return {"model": self.model, "settings": s, "seeds": seeds(self.settings.split,
                                                                   self.settings.cases * len(self.settings.lengths)),
                "reference": self.reference, "profiles": self.rows, "interrupted": self.interrupted,
                "wall_s": round(self.wall_s, 1)}


def evaluate(lm, profiles: list, s: Settings, progress: bool | None = None) -> Run:
    """Run every profile (a list of `Profile`); a KeyboardInterrupt returns the rows finished so far."""
    from tqdm import tqdm

    run = Run(s, lm.desc.name)
    t0 = time.perf_counter()
    cases = plan(lm.tokenizer, s)
    ids = fidelity.text_ids(lm.tokenizer, s.text, s.prefix, s.scored) if s.scored else None
    total = len(profiles) * (len(cases) + bool(ids)) + bool(ids)
    bar = tqdm(total=total, desc="eval", unit="run", file=sys.stderr, dynamic_ncols=True,
               disable=not (sys.stderr.isatty() if progress is None else progress))
    try:
        ref = None
        if ids:
            from kvchat.profiles import load_profile

            bar.set_postfix_str("full (fidelity reference)")
            ref = fidelity.reference(Engine(lm, load_profile("full")), ids, s.prefix)
            run.reference = {"ppl": ref.ppl, **ref.run}
            bar.update(1)
        for prof in profiles:
            run.rows.append(_profile(lm, prof, cases, ids, ref, s, bar))
    except KeyboardInterrupt:
        run.interrupted = True
    finally:
        bar.close()
        run.wall_s = time.perf_counter() - t0
    return run


def _profile(lm, prof, cases, ids, ref, s: Settings, bar) -> dict:
    t = time.perf_counter()
    bar.set_postfix_str(prof.name)
    engine = Engine(lm, prof, progress=lambda m: bar.write(m, file=sys.stderr))  # calibration messages
    done = []
    for case in cases:
        done.append(run_case(engine, case, s.max_new_tokens))
        bar.update(1)
    fid = None
    if ids:
        is_full = not prof.methods
        fid = fidelity.of_reference(ref) if is_full else fidelity.measure(engine, ids, s.prefix, ref)
        bar.update(1)
    return summarize(prof.name, prof.summary, done, fid, s, time.perf_counter() - t)


# ---- user input ------------------------------------------------------------------------------------
def parse_lengths(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x.replace("_", "")) for x in text.split(",") if x.strip())
    except ValueError:
        out = ()
    if not out:
        raise KvchatError(f"--lengths {text!r} is not a comma list of prompt token counts (e.g. 1024,2048)")
    small = [n for n in out if n < MIN_LENGTH]
    if small:
        raise KvchatError(f"--lengths {small[0]} is too short for the tasks; use at least {MIN_LENGTH} tokens")
    return tuple(dict.fromkeys(out))


def parse_tasks(text: str) -> tuple[str, ...]:
    out = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [t for t in out if t not in TASKS]
    if bad or not out:
        raise KvchatError(f"--tasks {text!r}: unknown task {bad[0] if bad else ''!r}; tasks: {', '.join(TASKS)}")
    return out


def load_profiles(text: str | None) -> list:
    """A comma list of shipped names or YAML paths; None: every shipped profile."""
    from kvchat.profiles import load_profile, shipped_names

    names = shipped_names() if text is None else [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise KvchatError(f"-p {text!r} names no profile; give shipped names or .yaml paths, comma separated")
    profiles = [load_profile(n) for n in dict.fromkeys(names)]
    if text is None and "full" in names:  # the baseline first
        profiles.sort(key=lambda p: p.name != "full")
    return profiles


def check_fits(s: Settings, max_positions: int) -> None:
    """Every prompt plus its answer, and the fidelity text, must fit the model's context."""
    over = [n for n in s.lengths if n + s.max_new_tokens > max_positions]
    if over:
        raise KvchatError(f"--lengths {over[0]:,} is over the model's context: {max_positions:,} positions, "
                          f"{s.max_new_tokens} kept for the answer (use at most {max_positions - s.max_new_tokens:,})")
    if s.scored and s.prefix + s.scored > max_positions:
        raise KvchatError(f"--prefix-tokens {s.prefix:,} + --scored-tokens {s.scored:,} is over the model's "
                          f"context of {max_positions:,} positions")
