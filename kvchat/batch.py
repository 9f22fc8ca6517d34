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
import sys

import click

from kvchat import templating
from kvchat.batch_io import (Done, Job, LineError, derive_seed, id_key, parse_bytes, parse_lines, read_done,
                             split_lines, write_json_atomic)
from kvchat.batch_output import EXIT_INTERRUPTED, Interrupts, OrderedWriter, Progress, Stats, summary_text
from kvchat.errors import PromptTooLong, TemplateError
from kvchat.stats import human_bytes


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


class Plan:
    """What a run has to do, read before anything loads: IN's jobs, what OUT already holds, the cap."""

    def __init__(self, inp: str, out: str, resume: bool, max_kv_bytes: str | None):
        self.inp, self.out, self.resume = inp, out, resume
        self.cap = _check_args(inp, out, resume, max_kv_bytes)
        self.jobs = parse_lines(_read_lines(inp))
        self.done = _read_done(out, resume, self.jobs)
        ids = self.done.ids
        self.todo = [j for j in self.jobs if id_key(j.id) not in ids]
        self.skipped_errors = self.done.errors({id_key(j.id) for j in self.jobs})

    def stats(self) -> Stats:
        return Stats(len(self.todo), skipped=len(self.jobs) - len(self.todo), skipped_errors=self.skipped_errors)

    def finish(self, summary: dict, summary_path: str | None, stats: Stats | None = None) -> dict:
        """Print (and save) the summary; an interrupted run exits 130 after saying how to finish it."""
        click.echo(summary_text(summary), err=True)
        if summary_path:
            write_json_atomic(summary_path, summary)
        if summary["interrupted"]:
            n = stats.ok + stats.errors if stats is not None else 0
            click.echo(f"kvchat batch: interrupted; {n:,} of {len(self.todo):,} lines written to {self.out}"
                       + ("; run again with --resume to finish" if self.out != "-" else ""), err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED)
        return summary

    def write(self, fill) -> bool:
        """Open OUT and run `fill(writer)`, which puts every record; -> whether Ctrl-C stopped it. A reader
        of `-` that goes away (`| head`) ends the run quietly, as cat does."""
        f, close = _open_out(self.out, self.resume, self.done)
        try:
            with Interrupts() as guard:
                try:
                    fill(OrderedWriter(f, guard))
                except KeyboardInterrupt:
                    return True
                except BrokenPipeError:
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                    raise click.exceptions.Exit(141) from None
        finally:
            if close:
                f.close()
        return False


def run_batch(opts: dict, inp: str, out: str, batch_size: int = 4, resume: bool = False,
              summary_path: str | None = None, max_kv_bytes: str | None = None, progress: bool | None = None,
              loaded=None, compare_full: bool = False) -> dict:
    """Run every line of IN; write OUT; print the summary on stderr and return it.

    `loaded` = (profile, lm) skips loading (tests, benchmarks). `compare_full` scores every answer with
    the full cache (kvchat/quality/compare.py) and adds a "quality" object to its line."""
    plan = Plan(inp, out, resume, max_kv_bytes)
    if not plan.todo:  # a finished run resumed: nothing to load
        return plan.finish(plan.stats().summary(None, opts, batch_size, plan.cap, False), summary_path)
    if loaded is None:
        from kvchat.loading import setup

        loaded = setup(opts)[:2]
    profile, lm = loaded
    from kvchat.engine import Engine

    from kvchat.quality.compare import TOPK, Averages

    todo = plan.todo
    reqs = prepare(todo, lm, opts, logprobs=TOPK if compare_full else 0)
    if plan.cap is not None:
        _warn_cap(reqs, todo, lm.desc.kv_bytes_per_token, plan.cap)
    engine = Engine(lm, profile, max_slots=batch_size)
    stats = plan.stats()
    quality = Averages() if compare_full else None
    if progress is None:
        progress = sys.stderr.isatty()

    def fill(writer: OrderedWriter) -> None:
        with Progress(len(todo), progress, stats) as bar:
            for pos, rec, res in results(engine, todo, reqs, plan.cap, quality):
                stats.add(res)
                writer.put(pos, rec)
                bar.step(engine.run_usage()[1])

    interrupted = plan.write(fill)
    return plan.finish(stats.summary(engine, opts, batch_size, plan.cap, interrupted, quality), summary_path, stats)


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


def results(engine, todo: list[Job], reqs, cap=None, quality=None):
    """Every job's record as it is ready: yields (position in `todo`, record, engine Result or None for an
    error record). Lines that could not run come first; the rest in the order the engine finishes them.
    The local run and each Ray worker both call this, so their lines are the same."""
    for pos, job in enumerate(todo):
        if job.error is not None:
            yield pos, job.error_record(), None
    failed: list[tuple[int, dict]] = []

    def on_error(req, exc) -> None:
        pos = int(req.id)
        failed.append((pos, todo[pos].error_record(str(exc))))

    by_id = {r.id: r for r in reqs}
    ref = engine.reference() if quality is not None else None
    for res in engine.run(reqs, max_kv_bytes=cap, on_error=on_error):
        while failed:
            yield (*failed.pop(0), None)
        pos = int(res.id)
        rec = result_record(todo[pos], res)
        if ref is not None:
            rec["quality"] = _quality(ref, by_id[res.id], res, quality)
        yield pos, rec, res
    while failed:
        yield (*failed.pop(0), None)
