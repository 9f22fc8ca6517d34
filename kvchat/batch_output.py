"""What `kvchat batch` writes: OUT in input order with each line whole, the run's summary, the progress bar.

Shared by the local run (kvchat/batch.py) and the Ray run (kvchat/batch_ray.py), so both keep the same
guarantees and print the same summary.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from contextlib import contextmanager

from kvchat.batch_io import encode_record, write_all
from kvchat.stats import human_bytes, kv_share

# Exit codes of `kvchat batch` (README, `kvchat batch --help`). 1 and 2: nothing ran (click's errors).
EXIT_SOME_FAILED = 3  # OUT is complete, but some lines are error records
EXIT_NONE_ANSWERED = 4  # every line is an error record
EXIT_INTERRUPTED = 130


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

    def put(self, pos: int, rec: dict | bytes) -> None:
        """`rec`: a record, or one already encoded (a Ray worker's line)."""
        self.waiting[pos] = rec if isinstance(rec, bytes) else encode_record(rec)
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

    def summary(self, engine, opts: dict, batch_size: int, cap: int | None, interrupted: bool, quality=None,
                usage=None) -> dict:
        """`usage` = (peak, average, most decoding at once) when no single engine ran (Ray workers)."""
        from kvchat.cache.usage import Usage

        if usage is None:
            usage = (*engine.run_usage(), engine.peak_live) if engine is not None else ((Usage(0, 0, 0, 0),) * 2 + (0,))
        peak, avg, live = usage
        wall = time.perf_counter() - self.t0
        s = {
            "model": opts["model"], "profile": opts["profile"], "batch_size": batch_size, "max_kv_bytes": cap,
            "prompts": self.n, "ok": self.ok, "errors": self.errors, "skipped": self.skipped,
            "skipped_errors": self.skipped_errors, "interrupted": interrupted,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(self.completion_tokens / max(wall, 1e-9), 2),
            "max_concurrent": live,
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
    r = s.get("ray")
    if r:
        up = "; ".join(f"{k.removesuffix('_s').replace('_', ' ')} at {r[k]:.1f} s"
                       for k in ("ray_start_s", "calibration_s", "first_line_s") if k in r)
        lines[-1] += " per worker"
        lines.append(f"ray ({r['address']}): {r['workers']} workers x {r['cpus_per_worker']} CPUs; {up}; "
                     f"{r['calibration_files']} calibration file(s) shipped, {r['calibrations_computed_by_workers']} "
                     "computed by workers")
    q = s.get("quality")
    if q:
        lines.append(f"quality vs full over {q['compared']:,} answers: KL {q['kl_mean']:.4f} nats/token, top-1 agreement "
                     f"{q['top1_agreement']:.1%}, {q['diverged']:,} diverged")
    return "\n".join(lines)


class Progress:
    """The tqdm bar on stderr: lines done, tokens/s over the run, the KV share saved on average."""

    def __init__(self, total: int, enabled: bool, stats: Stats):
        from tqdm import tqdm

        self.stats = stats
        self.bar = tqdm(total=total, desc="batch", unit="req", file=sys.stderr, disable=not enabled, dynamic_ncols=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()

    def step(self, avg, n: int = 1) -> None:
        """`avg`: the average Usage so far (None: not known yet)."""
        kv = f", KV {kv_share(avg.saved, avg.overhead)}" if avg is not None else ""
        self.bar.set_postfix_str(f"{self.stats.tokens_per_s():.1f} tok/s{kv}", refresh=False)
        self.bar.update(n)
