"""`kvchat batch IN OUT`: JSONL requests through the engine's slots, JSONL results in input order.

Results come out of the engine as sequences finish; a reorder buffer writes them in input order as soon as
every earlier line is written, each line whole (one write, then flush), so an interrupted run keeps every
finished line and `--resume` appends the rest. A bad line becomes an error record and the run goes on.

--resume treats error records as done too: they are deterministic (the same line fails the same way), and
re-running them would put their id in OUT twice. To retry a line, delete its record from OUT first. It
refuses an OUT that is not a kvchat results file before writing (or cutting) a byte of it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager

import click

from kvchat import templating
from kvchat.batch_io import (Done, Job, LineError, derive_seed, encode_record, id_key, parse_bytes, parse_lines,
                             read_done, split_lines, write_all, write_json_atomic)
from kvchat.errors import PromptTooLong, TemplateError
from kvchat.stats import human_bytes, kv_share

# Exit codes of `kvchat batch` (README, `kvchat batch --help`). 1 and 2: nothing ran (click's errors).
EXIT_SOME_FAILED = 3  # OUT is complete, but some lines are error records
EXIT_NONE_ANSWERED = 4  # every line is an error record
EXIT_INTERRUPTED = 130


# ---- requests ------------------------------------------------------------------------------------------
def encode_job(tok, job: Job, system: str | None, budget: int | None = None) -> list[int]:
    """A job's prompt ids (chat template, or plain text for a model without one). The line's `system` beats
    --system; a first system message in `messages` beats both. `budget`: --truncate left's token limit."""
    msgs = [{"role": "user", "content": job.prompt}] if job.prompt is not None else job.messages
    try:
        return templating.prompt_ids(tok, msgs, job.options.get("system", system), budget=budget)
    except (TemplateError, PromptTooLong) as e:
        raise LineError(str(e)) from None


def job_params(job: Job, opts: dict):
    from kvchat.engine import SamplingParams

    o = job.options
    seed = o.get("seed")
    if seed is None and opts.get("seed") is not None:
        seed = derive_seed(opts["seed"], job.id)
    return SamplingParams(max_new_tokens=o.get("max_new_tokens", opts["max_new_tokens"]),
                          temperature=o.get("temperature", opts["temperature"]), top_p=o.get("top_p", opts["top_p"]),
                          top_k=o.get("top_k", opts["top_k"]), seed=seed, stop=tuple(o.get("stop", ())))


def result_record(job: Job, res) -> dict:
    return {**job.record(), "text": res.text, "finish_reason": res.finish_reason,
            "usage": {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens},
            "kv": res.kv, "timing": res.timing}


# ---- output --------------------------------------------------------------------------------------------
class Interrupts:
    """SIGINT raises KeyboardInterrupt as usual, except while a line is being written: then right after it,
    so OUT never gets half a line from us."""

    def __init__(self):
        self.busy = self.pending = False
        self.old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)

    def _handle(self, signum, frame):
        if self.busy:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextmanager
    def writing(self):
        self.busy = True
        try:
            yield
        finally:
            self.busy = False
            if self.pending:
                self.pending = False
                raise KeyboardInterrupt


class OrderedWriter:
    """Reorder buffer: records arrive by position in any order and leave in order, each line whole."""

    def __init__(self, f, guard: Interrupts):
        self.f, self.guard = f, guard
        self.waiting: dict[int, bytes] = {}
        self.next = 0
        self.written = 0

    def put(self, pos: int, rec: dict) -> None:
        self.waiting[pos] = encode_record(rec)
        while self.next in self.waiting:
            with self.guard.writing():
                write_all(self.f, self.waiting.pop(self.next))
                self.next += 1
                self.written += 1


# ---- summary -------------------------------------------------------------------------------------------
class Stats:
    def __init__(self, n: int, skipped: int, skipped_errors: int = 0):
        self.n, self.skipped, self.skipped_errors = n, skipped, skipped_errors
        self.ok = self.errors = self.prompt_tokens = self.completion_tokens = 0
        self.t0 = time.perf_counter()

    def add(self, res=None) -> None:
        if res is None:
            self.errors += 1
            return
        self.ok += 1
        self.prompt_tokens += res.prompt_tokens
        self.completion_tokens += res.completion_tokens

    def tokens_per_s(self) -> float:
        return self.completion_tokens / max(time.perf_counter() - self.t0, 1e-9)

    def summary(self, engine, opts: dict, batch_size: int, cap: int | None, interrupted: bool, quality=None) -> dict:
        from kvchat.cache.usage import Usage

        peak, avg = engine.run_usage() if engine is not None else (Usage(0, 0, 0, 0),) * 2
        wall = time.perf_counter() - self.t0
        s = {
            "model": opts["model"], "profile": opts["profile"], "batch_size": batch_size, "max_kv_bytes": cap,
            "prompts": self.n, "ok": self.ok, "errors": self.errors, "skipped": self.skipped,
            "skipped_errors": self.skipped_errors, "interrupted": interrupted,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(self.completion_tokens / max(wall, 1e-9), 2),
            "max_concurrent": engine.peak_live if engine is not None else 0,
            "kv": {"peak_bytes_held": peak.held, "peak_bytes_full": peak.full, "peak_saved": peak.saved,
                   "peak_overhead": peak.overhead, "avg_bytes_held": avg.held, "avg_bytes_full": avg.full,
                   "avg_saved": avg.saved, "avg_overhead": avg.overhead},
            **({"quality": quality.summary()} if quality is not None else {}),
        }
        s["exit_code"] = exit_code(s)
        return s


def exit_code(s: dict) -> int:
    """0: every line of IN has an answer in OUT (this run's and, with --resume, earlier ones); 3: some are
    error records; 4: all are; 130: interrupted."""
    if s["interrupted"]:
        return EXIT_INTERRUPTED
    errors = s["errors"] + s["skipped_errors"]
    answered = s["ok"] + s["skipped"] - s["skipped_errors"]
    if not errors:
        return 0
    return EXIT_SOME_FAILED if answered else EXIT_NONE_ANSWERED


def summary_text(s: dict) -> str:
    kv = s["kv"]
    head = f"batch: {s['prompts']:,} prompts, {s['ok']:,} ok, {s['errors']:,} errors"
    if s["skipped"]:
        head += f" ({s['skipped']:,} skipped: already in OUT"
        head += f", {s['skipped_errors']:,} of them error records)" if s["skipped_errors"] else ")"
    lines = [
        head + (" [interrupted]" if s["interrupted"] else ""),
        f"tokens: {s['prompt_tokens']:,} prompt, {s['completion_tokens']:,} generated in {s['wall_s']:.1f} s "
        f"({s['tokens_per_s']:.1f} tokens/s over the run); up to {s['max_concurrent']} decoding at once",
        f"KV ({s['profile']}): peak {human_bytes(kv['peak_bytes_held'])} held vs {human_bytes(kv['peak_bytes_full'])} full "
        f"({kv_share(kv['peak_saved'], kv['peak_overhead'])}); average {human_bytes(kv['avg_bytes_held'])} vs "
        f"{human_bytes(kv['avg_bytes_full'])} ({kv_share(kv['avg_saved'], kv['avg_overhead'])})",
    ]
    q = s.get("quality")
    if q:
        lines.append(f"quality vs full over {q['compared']:,} answers: KL {q['kl_mean']:.4f} nats/token, top-1 agreement "
                     f"{q['top1_agreement']:.1%}, {q['diverged']:,} diverged")
    return "\n".join(lines)


# ---- the run -------------------------------------------------------------------------------------------
def _read_lines(inp: str):
    try:
        if inp == "-":
            return split_lines(sys.stdin.buffer.read())
        with open(inp, "rb") as f:
            return split_lines(f.read())
    except OSError as e:
        raise click.ClickException(f"cannot read {inp}: {e.strerror}") from None


def _open_out(out: str, resume: bool, done: Done):
    if out == "-":
        sys.stdout.flush()
        return sys.stdout.buffer, False
    try:
        if resume and done.end < done.size:  # a killed run's partial line: append after the last whole one
            os.truncate(out, done.end)
        return open(out, "ab" if resume else "wb", buffering=0), True
    except OSError as e:
        raise click.ClickException(f"cannot write {out}: {e.strerror}") from None


def _read_done(out: str, resume: bool, jobs: list[Job]) -> Done:
    """What OUT already holds (--resume), refusing an OUT that is not the results of this IN."""
    if not resume:
        return Done()
    try:
        done = read_done(out)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    ids = done.ids
    if ids and not any(id_key(j.id) in ids for j in jobs):
        raise click.ClickException(f"none of the {len(ids):,} ids in {out} is an id of IN, so --resume will not "
                                   "append to it; give the OUT of an earlier run of this IN")
    return done


def _warn_cap(reqs, jobs: list[Job], per_token: int, cap: int) -> None:
    """Once: requests whose prompt alone, at full size, needs more KV than --max-kv-bytes. The engine runs
    such a request when nothing else is decoding, so the cap is exceeded while it runs."""
    big = [(len(r.prompt_ids) * per_token, jobs[int(r.id)].line) for r in reqs if len(r.prompt_ids) * per_token > cap]
    if big:
        need, line = max(big)
        click.echo(f"kvchat batch: warning: {len(big):,} request(s) need more KV for their prompt alone than "
                   f"--max-kv-bytes {human_bytes(cap)} (largest: line {line}, {human_bytes(need)} at full size); "
                   "each runs alone, over the cap", err=True)


def _check_args(inp, out, resume, max_kv_bytes) -> int | None:
    try:
        cap = parse_bytes(max_kv_bytes) if max_kv_bytes is not None else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--max-kv-bytes'") from None
    if resume and out == "-":
        raise click.UsageError("--resume needs OUT to be a file (it reads what is already done), not -")
    if inp != "-" and out != "-" and os.path.exists(out) and os.path.samefile(inp, out):
        raise click.UsageError(f"IN and OUT are the same file ({out}); write the results elsewhere")
    return cap


def prepare(jobs: list[Job], lm, opts: dict, logprobs: int = 0):
    """Encode every runnable job; one whose template or options fail gets its error instead."""
    from kvchat.engine import Request

    reqs = []
    for pos, job in enumerate(jobs):
        if job.error is None:
            params = job_params(job, opts)
            budget = (templating.left_budget(lm.desc.max_positions, params.max_new_tokens)
                      if opts.get("truncate") == "left" else None)
            try:
                reqs.append(Request(str(pos), encode_job(lm.tokenizer, job, opts.get("system"), budget), params,
                                    logprobs=logprobs))
            except LineError as e:
                job.error = str(e)
    return reqs


def run_batch(opts: dict, inp: str, out: str, batch_size: int = 4, resume: bool = False,
              summary_path: str | None = None, max_kv_bytes: str | None = None, progress: bool | None = None,
              loaded=None, compare_full: bool = False) -> dict:
    """Run every line of IN; write OUT; print the summary on stderr and return it.

    `loaded` = (profile, lm) skips loading (tests, benchmarks). `compare_full` scores every answer with
    the full cache (kvchat/quality/compare.py) and adds a "quality" object to its line."""
    cap = _check_args(inp, out, resume, max_kv_bytes)
    jobs = parse_lines(_read_lines(inp))
    done = _read_done(out, resume, jobs)
    ids = done.ids
    todo = [j for j in jobs if id_key(j.id) not in ids]
    skipped_errors = done.errors({id_key(j.id) for j in jobs})
    if not todo:  # a finished run resumed: nothing to load
        summary = Stats(0, skipped=len(jobs), skipped_errors=skipped_errors).summary(None, opts, batch_size, cap, False)
        click.echo(summary_text(summary), err=True)
        if summary_path:
            write_json_atomic(summary_path, summary)
        return summary
    if loaded is None:
        from kvchat.loading import setup

        loaded = setup(opts)[:2]
    profile, lm = loaded
    from kvchat.engine import Engine

    from kvchat.quality.compare import TOPK, Averages

    reqs = prepare(todo, lm, opts, logprobs=TOPK if compare_full else 0)
    if cap is not None:
        _warn_cap(reqs, todo, lm.desc.kv_bytes_per_token, cap)
    engine = Engine(lm, profile, max_slots=batch_size)
    stats = Stats(len(todo), skipped=len(jobs) - len(todo), skipped_errors=skipped_errors)
    quality = Averages() if compare_full else None
    if progress is None:
        progress = sys.stderr.isatty()
    f, close = _open_out(out, resume, done)
    interrupted = False
    try:
        with Interrupts() as guard:
            try:
                _generate(engine, todo, reqs, OrderedWriter(f, guard), stats, cap, progress, quality)
            except KeyboardInterrupt:
                interrupted = True
            except BrokenPipeError:  # the reader of `-` went away (`| head`): stop quietly, as cat does
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                raise click.exceptions.Exit(141) from None
    finally:
        if close:
            f.close()
    summary = stats.summary(engine, opts, batch_size, cap, interrupted, quality)
    click.echo(summary_text(summary), err=True)
    if summary_path:
        write_json_atomic(summary_path, summary)
    if interrupted:
        click.echo(f"kvchat batch: interrupted; {stats.ok + stats.errors:,} of {len(todo):,} lines written to {out}"
                   + ("; run again with --resume to finish" if out != "-" else ""), err=True)
        raise click.exceptions.Exit(EXIT_INTERRUPTED)
    return summary


def _quality(ref, req, res, averages) -> dict:
    """The answer scored by the full cache; the prompt is what the engine ran (its end, if truncated)."""
    from kvchat.errors import KvchatError
    from kvchat.quality.compare import compare_answer, public

    try:
        q = compare_answer(ref, req.prompt_ids[len(req.prompt_ids) - res.prompt_tokens:], res.logprobs)
    except KvchatError as e:
        return {"error": str(e)}
    averages.add(q)
    return public(q)


def _generate(engine, todo: list[Job], reqs, writer: OrderedWriter, stats: Stats, cap, progress: bool,
              quality=None) -> None:
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="batch", unit="req", file=sys.stderr, disable=not progress, dynamic_ncols=True)

    def finish(pos: int, rec: dict, res=None) -> None:
        stats.add(res)
        writer.put(pos, rec)
        avg = engine.run_usage()[1]
        bar.set_postfix_str(f"{stats.tokens_per_s():.1f} tok/s, KV {kv_share(avg.saved, avg.overhead)}", refresh=False)
        bar.update(1)

    def on_error(req, exc) -> None:
        pos = int(req.id)
        finish(pos, todo[pos].error_record(str(exc)))

    try:
        for pos, job in enumerate(todo):
            if job.error is not None:
                finish(pos, job.error_record())
        by_id = {r.id: r for r in reqs}
        ref = engine.reference() if quality is not None else None
        for res in engine.run(reqs, max_kv_bytes=cap, on_error=on_error):
            pos = int(res.id)
            rec = result_record(todo[pos], res)
            if ref is not None:
                rec["quality"] = _quality(ref, by_id[res.id], res, quality)
            finish(pos, rec, res)
    finally:
        bar.close()
