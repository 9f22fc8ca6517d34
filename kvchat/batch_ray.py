"""`kvchat batch IN OUT --ray [ADDRESS]`: the same run on Ray Data, through a pool of actors each holding
one engine. Same files, same guarantees as the local run (kvchat/batch.py).

What runs where:
- The driver (this process) reads and checks IN, reads OUT for --resume, and writes OUT, with the local
  run's code (`Plan`): bad lines become the same error records, --resume skips the same ids, every line is
  written whole and in input order. It never loads the model.
- One Ray task loads the model and profile and binds the methods, which computes any calibration the
  profile needs (razor's heads, kvsharer's share map, cskv's factors) or reads it from that node's cache.
  The files go into Ray's object store once; every actor installs them in its own KVCHAT_HOME before it
  binds, so no actor calibrates.
- Ray Data carries the runnable jobs, in input order, through `map_batches` to `--workers` actors. Each
  actor runs its batches through one engine with continuous batching over `--batch-size` slots
  (`kvchat.batch.results`, what the local run calls) and returns every line already encoded.
- The driver writes lines as they come back, through the same reorder buffer.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import socket
import sys
import time
from types import SimpleNamespace

import click

from kvchat.batch import Plan, prepare, results
from kvchat.batch_output import Progress
from kvchat.calibration import cache

INSTALL = "pip install 'kvchat[ray]'"
CHUNK_PER_SLOT = 4  # a map batch holds this many jobs per slot, so continuous batching has work queued


def check_address(value: str) -> str | None:
    """--ray's value -> the address to join (None: start a local instance)."""
    if value == "local":
        return None
    if re.fullmatch(r"auto|(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d+", value):
        return value
    raise click.UsageError(f"--ray={value!r} is not a Ray address; give host:port, ray://host:port or auto "
                           "(or --ray alone for a local Ray instance)")


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401  (ray without the data extra has no ray.data)
    except ImportError:
        raise click.ClickException(f"--ray needs Ray Data, which is not installed; install it with: {INSTALL}") from None
    return ray


class Worker:
    """A Ray actor: one engine over `batch_size` slots, for the model and profile of the run."""

    def __init__(self, opts: dict, batch_size: int, threads: int, cap: int | None, shipped: dict):
        import ray
        import torch

        from kvchat.engine import Engine
        from kvchat.errors import KvchatError
        from kvchat.loading import setup

        torch.set_num_threads(threads)
        self.opts, self.cap = opts, cap
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.error = None
        try:
            self.installed = cache.install(ray.get(shipped["calibrations"]))
            profile, self.lm = setup(opts)[:2]
            self.engine = Engine(self.lm, profile, max_slots=batch_size)
        except KvchatError as e:  # a model that does not load: the driver ends the run with this message
            self.error = str(e)

    def __call__(self, batch: dict) -> dict:
        if self.error is not None:  # as data: Ray Data would bury an exception's message in its own
            return {"pos": [-1], "line": [b""], "ok": [False], "prompt_tokens": [0], "completion_tokens": [0],
                    "worker": [json.dumps({"worker": self.name, "fatal": self.error})]}
        jobs = [pickle.loads(b) for b in batch["job"]]
        reqs = prepare(jobs, self.lm, self.opts)
        out = {"pos": [], "line": [], "ok": [], "prompt_tokens": [], "completion_tokens": []}
        from kvchat.batch_io import encode_record

        for i, rec, res in results(self.engine, jobs, reqs, self.cap):
            out["pos"].append(int(batch["pos"][i]))
            out["line"].append(encode_record(rec))
            out["ok"].append(res is not None)
            out["prompt_tokens"].append(res.prompt_tokens if res is not None else 0)
            out["completion_tokens"].append(res.completion_tokens if res is not None else 0)
        peak, avg = self.engine.run_usage()
        state = json.dumps({"worker": self.name, "peak": [peak.held, peak.full], "avg": [avg.held, avg.full],
                            "live": self.engine.peak_live, "computed": cache.computed(), "installed": self.installed})
        out["worker"] = [state] * len(out["pos"])
        return out


def _calibrations(opts: dict) -> dict[str, bytes] | str:
    """(A Ray task.) Load the model and profile once and bind the methods: -> the calibration files used,
    or the error that stopped it."""
    from kvchat.engine import Engine
    from kvchat.errors import KvchatError
    from kvchat.loading import setup

    try:
        profile, lm = setup(opts)[:2]
        Engine(lm, profile, max_slots=1)
    except KvchatError as e:
        return str(e)
    return cache.bundle()


class Workers:
    """What the actors reported last: per-worker KV figures, pooled into the summary's."""

    def __init__(self):
        self.last: dict[str, dict] = {}
        self.lines: dict[str, int] = {}

    def note(self, state: str) -> None:
        s = json.loads(state)
        self.last[s["worker"]] = s
        self.lines[s["worker"]] = self.lines.get(s["worker"], 0) + 1

    def usage(self):
        """(peak, average, most decoding at once), per worker: the peak of the worker that held the most,
        the average over workers weighted by the lines each answered."""
        from kvchat.cache.usage import Usage

        if not self.last:
            return Usage(0, 0, 0, 0), Usage(0, 0, 0, 0), 0
        top = max(self.last.values(), key=lambda s: s["peak"][0])
        n = sum(self.lines.values())
        avg = [round(sum(s["avg"][i] * self.lines[w] for w, s in self.last.items()) / n) for i in (0, 1)]
        peak = Usage(*top["peak"], *top["peak"])
        return peak, Usage(*avg, *top["peak"]), max(s["live"] for s in self.last.values())

    def average(self):
        return self.usage()[1] if self.last else None

    def computed(self) -> int:
        return sum(s["computed"] for s in self.last.values())


def _start(ray, address: str | None, workers: int, worker_cpus: int | None) -> int:
    """Start (or join) Ray; -> CPUs per worker. Refuses a pool the cluster cannot hold."""
    logging.getLogger("ray").setLevel(logging.ERROR)
    kw = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    if address is None:
        need = workers * (worker_cpus or 1)
        ray.init(num_cpus=max(os.cpu_count() or 1, need), **kw)
    else:
        try:
            ray.init(address=address, **kw)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise click.ClickException(f"cannot join the Ray cluster at {address}: {e} (start one with "
                                       "`ray start --head`, then give its address, e.g. --ray 10.0.0.1:6379)") from None
    cpus = int(ray.cluster_resources().get("CPU", 0))
    per = worker_cpus or max(1, cpus // workers)
    if address is None and per * workers > (os.cpu_count() or 1):
        click.echo(f"kvchat batch: warning: {workers} workers x {per} threads on {os.cpu_count()} cores: they will "
                   "slow each other (lower --workers or --worker-cpus)", err=True)
    if per * workers > cpus:
        ray.shutdown()
        raise click.ClickException(f"--workers {workers} x {per} CPUs each needs {per * workers} CPUs; the Ray cluster "
                                   f"has {cpus} (lower --workers or --worker-cpus)")
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    return per


def _dataset(ray, items: list[dict], chunk: int, per: int, workers: int, worker_kwargs: dict):
    """The jobs through the actor pool, `chunk` jobs a map batch, in input order."""
    import warnings

    with warnings.catch_warnings():
        # Ray 2.60 deprecates per-actor remote args (removed in 2.64; the extra pins below it) and has no
        # named parameter for max_restarts yet.
        warnings.simplefilter("ignore", DeprecationWarning)
        # One block per map batch: blocks are what Ray Data hands out, so small ones spread the work over
        # every actor and stream lines back as each finishes.
        blocks = -(-len(items) // chunk)
        return ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            Worker, batch_size=chunk, batch_format="numpy", num_cpus=per, fn_constructor_kwargs=worker_kwargs,
            # One batch at a time per actor: a batch queued behind a busy actor waits while another actor,
            # still loading or already idle, could run it.
            # No more actors than batches: an actor with nothing to do would still load the model.
            compute=ray.data.ActorPoolStrategy(size=min(workers, blocks), max_tasks_in_flight_per_actor=1),
            # A worker that dies ends the run (OUT keeps its whole lines; --resume goes on) rather than being
            # restarted: Ray cannot promise a restart here (its arguments live in the object store) and says
            # so on stderr for every actor otherwise.
            ray_remote_args_fn=lambda: {"max_restarts": 0})


def _failed(e: Exception) -> click.ClickException:
    """Ray's own failure (a worker process lost, a cluster gone), in one line."""
    msg = [x for x in str(getattr(e, "cause", None) or e).strip().splitlines() if x.strip()]
    return click.ClickException(f"the Ray run failed: {msg[-1] if msg else type(e).__name__}; OUT keeps the lines "
                                "written so far (finish with --resume)")


def run_batch_ray(opts: dict, inp: str, out: str, address: str | None = None, workers: int = 2,
                  worker_cpus: int | None = None, batch_size: int = 4, resume: bool = False,
                  summary_path: str | None = None, max_kv_bytes: str | None = None,
                  progress: bool | None = None) -> dict:
    """`kvchat batch IN OUT --ray [ADDRESS]`: as `run_batch`, on a pool of `workers` Ray actors."""
    ray = _ray()
    from kvchat.profiles import load_profile

    profile = load_profile(opts["profile"])  # a typo fails here, before Ray starts
    plan = Plan(inp, out, resume, max_kv_bytes)
    if not plan.todo:
        return plan.finish(plan.stats().summary(None, opts, batch_size, plan.cap, False), summary_path)
    t0 = time.perf_counter()
    per = _start(ray, address, workers, worker_cpus)
    try:
        return _run(ray, plan, opts, address, workers, per, batch_size, summary_path, progress,
                    {"t0": t0, "ray_start_s": time.perf_counter() - t0},
                    calibrates=any(hasattr(m, "calibrate") for m in profile.methods))
    finally:
        ray.shutdown()


def _run(ray, plan: Plan, opts, address, workers, per, batch_size, summary_path, progress, clock: dict,
         calibrates: bool) -> dict:
    """`clock`: t0 (the run's start) and the seconds each start-up stage ended at. `calibrates`: a method of
    the profile needs a calibration (else no task loads the model before the actors)."""
    from ray.exceptions import RayError

    shipped = {}
    try:
        if calibrates:
            shipped = ray.get(ray.remote(num_cpus=per)(_calibrations).remote(opts))
            if isinstance(shipped, str):
                raise click.ClickException(shipped)
            clock["calibration_s"] = time.perf_counter() - clock["t0"]
        todo = plan.todo
        stats, seen = plan.stats(), Workers()  # the run's seconds include the actors' start-up
        items = [{"pos": i, "job": pickle.dumps(j)} for i, j in enumerate(todo) if j.error is None]
        batches = iter(())
        if items:
            kw = {"opts": opts, "batch_size": batch_size, "threads": per, "cap": plan.cap,
                  "shipped": {"calibrations": ray.put(shipped)}}
            batches = iter(_dataset(ray, items, batch_size * CHUNK_PER_SLOT, per, workers, kw)
                           .iter_batches(batch_size=None, batch_format="numpy"))
        # The first batch before OUT is opened: a model that does not load fails the run before a byte of
        # OUT is written or cut, as in the local run.
        head = _checked(next(batches, None))
    except RayError as e:
        raise _failed(e) from None
    except KeyboardInterrupt:
        raise click.ClickException("interrupted while the Ray workers started; OUT was not touched") from None
    clock["first_line_s"] = time.perf_counter() - clock["t0"]
    if progress is None:
        progress = sys.stderr.isatty()

    def fill(writer) -> None:
        with Progress(len(todo), progress, stats) as bar:
            for i, job in enumerate(todo):  # lines that cannot run never leave the driver
                if job.error is not None:
                    stats.add(None)
                    writer.put(i, job.error_record())
                    bar.step(None)
            try:
                b = head
                while b is not None:
                    for pos, line, ok, pt, ct, w in zip(b["pos"], b["line"], b["ok"], b["prompt_tokens"],
                                                        b["completion_tokens"], b["worker"]):
                        stats.add(SimpleNamespace(prompt_tokens=int(pt), completion_tokens=int(ct)) if ok else None)
                        seen.note(w)
                        writer.put(int(pos), bytes(line))
                        bar.step(seen.average())
                    b = _checked(next(batches, None))
            except RayError as e:
                raise _failed(e) from None

    interrupted = plan.write(fill)
    summary = stats.summary(None, opts, batch_size, plan.cap, interrupted, usage=seen.usage())
    summary["ray"] = {"address": address or "local", "workers": workers, "cpus_per_worker": per,
                      **{k: round(v, 3) for k, v in clock.items() if k != "t0"},
                      "calibration_files": len(shipped), "calibrations_computed_by_workers": seen.computed()}
    return plan.finish(summary, summary_path, stats)


def _checked(batch: dict | None) -> dict | None:
    """A worker's batch, or its fatal error (a model that does not load there) as the run's error."""
    if batch is not None and len(batch["pos"]) and batch["pos"][0] < 0:
        raise click.ClickException(json.loads(batch["worker"][0])["fatal"])
    return batch
