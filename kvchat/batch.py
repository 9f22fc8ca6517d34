"""`kvchat batch IN OUT`: JSONL requests through the engine's slots, JSONL results in input order.

Results come out of the engine as sequences finish; a reorder buffer writes them in input order as soon as
every earlier line is written, each line whole (one write, then flush), so an interrupted run keeps every
finished line and `--resume` appends the rest. A bad line becomes an error record and the run goes on.

--resume treats error records as done too: they are deterministic (the same line fails the same way), and
re-running them would put their id in OUT twice. To retry a line, delete its record from OUT first.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager

import click

from kvchat.batch_io import (Job, LineError, derive_seed, encode_record, id_key, parse_bytes, parse_lines,
                             read_done, write_all, write_json_atomic)


# ---- requests ------------------------------------------------------------------------------------------
def encode_job(tok, job: Job, system: str | None) -> list[int]:
    """A job's chat-templated prompt ids. The line's `system` beats --system; a first system message in
    `messages` beats both."""
    msgs = [{"role": "user", "content": job.prompt}] if job.prompt is not None else job.messages
    system = job.options.get("system", system)
    if system and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system}] + msgs
    if getattr(tok, "chat_template", None) is None:  # a base model: prompt lines go in as plain text
        if job.prompt is None:
            raise LineError("the model has no chat template; use 'prompt' lines, not 'messages'")
        return tok((system + "\n\n" if system else "") + job.prompt)["input_ids"]
    try:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja2 raises on conversations a template refuses (e.g. roles out of turn)
        raise LineError(f"the chat template refused these messages: {e}") from None
    return tok(text, add_special_tokens=False)["input_ids"]


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
    def __init__(self, n: int, skipped: int):
        self.n, self.skipped = n, skipped
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
        st = engine.store if engine is not None else None
        peak_h, peak_f = (st.peak_held, st.peak_full) if st else (0, 0)
        avg_h, avg_f = kv_average(st)
        wall = time.perf_counter() - self.t0
        extra = {"quality": quality.summary()} if quality is not None else {}
        return {
            "model": opts["model"], "profile": opts["profile"], "batch_size": batch_size, "max_kv_bytes": cap,
            "prompts": self.n, "ok": self.ok, "errors": self.errors, "skipped": self.skipped,
            "interrupted": interrupted,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(self.completion_tokens / max(wall, 1e-9), 2),
            "max_concurrent": engine.peak_live if engine is not None else 0,
            "kv": {"peak_bytes_held": peak_h, "peak_bytes_full": peak_f, "peak_saved": _saved(peak_h, peak_f),
                   "avg_bytes_held": avg_h, "avg_bytes_full": avg_f, "avg_saved": _saved(avg_h, avg_f)},
            **extra,
        }


def _saved(held, full) -> float:
    return round(1 - held / full, 4) if full else 0.0


def kv_average(store) -> tuple[int, int]:
    """Bytes held and full averaged over the store's updates (every prefill and decode step)."""
    n = getattr(store, "n_notes", 0)
    return (round(store.sum_held / n), round(store.sum_full / n)) if n else (0, 0)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def summary_text(s: dict) -> str:
    kv = s["kv"]
    head = f"batch: {s['prompts']:,} prompts, {s['ok']:,} ok, {s['errors']:,} errors"
    if s["skipped"]:
        head += f" ({s['skipped']:,} skipped: already in OUT)"
    lines = [
        head + (" [interrupted]" if s["interrupted"] else ""),
        f"tokens: {s['prompt_tokens']:,} prompt, {s['completion_tokens']:,} generated in {s['wall_s']:.1f} s "
        f"({s['tokens_per_s']:.1f} tokens/s); up to {s['max_concurrent']} decoding at once",
        f"KV ({s['profile']}): peak {_mb(kv['peak_bytes_held'])} held vs {_mb(kv['peak_bytes_full'])} full "
        f"({kv['peak_saved']:.0%} saved); average {_mb(kv['avg_bytes_held'])} vs {_mb(kv['avg_bytes_full'])} "
        f"({kv['avg_saved']:.0%} saved)",
    ]
    q = s.get("quality")
    if q:
        lines.append(f"quality vs full over {q['compared']:,} answers: KL {q['kl_mean']:.4f} nats/token, top-1 agreement "
                     f"{q['top1_agreement']:.1%}, {q['diverged']:,} diverged")
    return "\n".join(lines)


# ---- the run -------------------------------------------------------------------------------------------
def _read_lines(inp: str) -> list[str]:
    try:
        data = sys.stdin.buffer.read() if inp == "-" else open(inp, "rb").read()
    except OSError as e:
        raise click.ClickException(f"cannot read {inp}: {e.strerror}") from None
    raw = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")  # a BOM (Windows editors) is not part of line 1
    if raw and raw[-1] == b"":  # the newline ending the last line does not start another one
        raw.pop()
    # A line that is not UTF-8 keeps its place and fails as invalid JSON.
    return [r.rstrip(b"\r").decode("utf-8", errors="replace") for r in raw]


def _open_out(out: str, resume: bool):
    if out == "-":
        sys.stdout.flush()
        return sys.stdout.buffer, False
    try:
        return open(out, "ab" if resume else "wb", buffering=0), True
    except OSError as e:
        raise click.ClickException(f"cannot write {out}: {e.strerror}") from None


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
            try:
                reqs.append(Request(str(pos), encode_job(lm.tokenizer, job, opts.get("system")), job_params(job, opts),
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
    try:
        done = read_done(out) if resume else set()
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    todo = [j for j in jobs if id_key(j.id) not in done]
    if not todo:  # a finished run resumed: nothing to load
        summary = Stats(0, skipped=len(jobs)).summary(None, opts, batch_size, cap, False)
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
    engine = Engine(lm, profile, max_slots=batch_size, truncate="left" if opts.get("truncate") == "left" else None)
    quality = Averages() if compare_full else None
    stats = Stats(len(todo), skipped=len(jobs) - len(todo))
    if progress is None:
        progress = sys.stderr.isatty()
    f, close = _open_out(out, resume)
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
        raise click.exceptions.Exit(130)
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
        h, f = kv_average(engine.store)
        bar.set_postfix_str(f"{stats.tokens_per_s():.1f} tok/s, KV saved {1 - h / f if f else 0:.0%}", refresh=False)
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
