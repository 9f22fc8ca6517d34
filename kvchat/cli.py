"""kvchat's command line: chat (the default), batch, eval, profiles, calibrate. Thin: parsing and errors only."""

from __future__ import annotations

import functools
import os
import sys

import click

from kvchat.errors import KvchatError
from kvchat.loading import setup
from kvchat.model import EMBEDDED

COMMON = ("model", "profile", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "system", "device",
          "dtype", "truncate")


def common_options(f):
    """Options shared by chat and batch; given before or after the subcommand."""
    opts = [
        click.option("--model", "-m", default=None, help=f"Model: {EMBEDDED} (embedded, default), a local dir or a hub id. Env KVCHAT_MODEL."),
        click.option("--profile", "-p", default=None, help="Compression profile: a shipped name (kvchat profiles list) or a .yaml path. Env KVCHAT_PROFILE; default full."),
        click.option("--max-new-tokens", type=click.IntRange(1), default=None, help="Most tokens to generate per answer [default 256]."),
        click.option("--temperature", type=click.FloatRange(0), default=None, help="Sampling temperature; 0 is greedy [default 0]."),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None, help="Nucleus sampling mass [default 1.0]."),
        click.option("--top-k", type=click.IntRange(0), default=None, help="Sample among the k most likely tokens; 0 is off [default 0]."),
        click.option("--seed", type=int, default=None, help="Random seed for sampling (per request in batch mode)."),
        click.option("--system", default=None, help="System prompt."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="Where to run [default auto]."),
        click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default=None, help="Weights and KV dtype [default auto: bfloat16 on CUDA and on CPUs with native bf16, else float32]."),
        click.option("--truncate", type=click.Choice(["error", "left"]), default=None, help="A prompt longer than the context: error (default) or keep its end."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def merged(ctx: click.Context, local: dict) -> dict:
    """Subcommand options override group options; then env; then defaults."""
    group = ctx.find_root().params
    out = {k: local.get(k) if local.get(k) is not None else group.get(k) for k in COMMON}
    out["model"] = out["model"] or os.environ.get("KVCHAT_MODEL") or EMBEDDED
    out["profile"] = out["profile"] or os.environ.get("KVCHAT_PROFILE") or "full"
    defaults = {"max_new_tokens": 256, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "device": "auto",
                "dtype": "auto", "truncate": "error"}
    for k, v in defaults.items():
        if out[k] is None:
            out[k] = v
    return out


def user_errors(f):
    """Turn kvchat's user errors into one-line click errors (no traceback)."""

    @functools.wraps(f)
    def wrapper(*a, **kw):
        try:
            return f(*a, **kw)
        except KvchatError as e:
            raise click.ClickException(str(e)) from None

    return wrapper


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@common_options
@click.option("--interactive/--no-interactive", "-i", default=None, help="Force the REPL (or pipe mode) whatever stdin is.")
@click.option("--quiet", "-q", is_flag=True, help="No per-answer stats line in the REPL.")
@click.version_option(package_name="kvchat")
@click.pass_context
@user_errors
def main(ctx, interactive, quiet, **_):
    """Chat with a language model whose KV cache is compressed, for real.

    \b
    Examples:
      kvchat --profile window                 # interactive chat on the embedded model
      echo "What is the capital of France?" | kvchat -p window
      kvchat batch in.jsonl out.jsonl -p window
      kvchat profiles list
    """
    if ctx.invoked_subcommand is None:
        run_chat(ctx, merged(ctx, {}), interactive, quiet)


@main.command()
@common_options
@click.option("--interactive/--no-interactive", "-i", default=None, help="Force the REPL (or pipe mode) whatever stdin is.")
@click.option("--quiet", "-q", is_flag=True, help="No per-answer stats line in the REPL.")
@click.pass_context
@user_errors
def chat(ctx, interactive, quiet, **local):
    """Chat (the default command). With stdin not a terminal, answer it once and print only the answer.

    \b
    Examples:
      kvchat chat -p window --temperature 0.7
      cat question.txt | kvchat chat -p window > answer.txt
    """
    run_chat(ctx, merged(ctx, local), interactive, quiet)


def run_chat(ctx, opts: dict, interactive, quiet: bool) -> None:
    from kvchat.session import Session

    tty = sys.stdin.isatty()
    if interactive is None:
        interactive = tty
    if not interactive:
        text = sys.stdin.read().strip()
        if not text:
            raise click.UsageError("stdin is empty: pipe a prompt in (echo 'hello' | kvchat) or run kvchat in a terminal")
    profile, lm, params = setup(opts)
    session = Session(lm, profile, params, system=opts["system"], truncate=None if opts["truncate"] == "error" else "left")
    if interactive:
        from kvchat.quality.compare import TOPK

        session.logprobs = TOPK  # /compare scores the last answer
    if not interactive:
        out = sys.stdout
        from kvchat.stats import prefill_progress

        err = (lambda s: (sys.stderr.write(s), sys.stderr.flush())) if sys.stderr.isatty() else (lambda s: None)
        session.ask(text, on_token=lambda _id, delta: (out.write(delta), out.flush()),
                    on_progress=prefill_progress(err))
        out.write("\n")
        out.flush()
        return
    from kvchat.repl import run_repl

    run_repl(session, opts, quiet=quiet)


# What --ray's optional value may be: host:port, ray://host:port, auto (kvchat.batch_ray.check_address).
RAY_ADDRESS = r"auto|(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d+"


class BatchCommand(click.Command):
    """`--ray` takes an optional ADDRESS; Click would take any next word, so `batch --ray in.jsonl out.jsonl`
    would read in.jsonl as the address. A next word that is no address is left to be IN."""

    def parse_args(self, ctx, args):
        import re

        args = list(args)
        for i, a in enumerate(args):
            if a == "--ray" and (i + 1 == len(args) or not re.fullmatch(RAY_ADDRESS, args[i + 1])):
                args[i] = "--ray=local"
        return super().parse_args(ctx, args)


@main.command(cls=BatchCommand)
@click.argument("inp", metavar="IN", type=click.Path(allow_dash=True, dir_okay=False))
@click.argument("out", metavar="OUT", type=click.Path(allow_dash=True, dir_okay=False))
@common_options
@click.option("--batch-size", "-b", type=click.IntRange(1), default=4, show_default=True, help="Sequences decoded together (continuous batching).")
@click.option("--resume", is_flag=True, help="Skip ids already in OUT and append the rest.")
@click.option("--summary", "summary_path", type=click.Path(dir_okay=False), default=None, help="Also write the run summary as JSON to this file.")
@click.option("--max-kv-bytes", default=None, help="Admit a new request only while the KV bytes held stay under this (e.g. 2GiB, 500MB).")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr [default: when stderr is a terminal].")
@click.option("--compare-full", is_flag=True, help="Score each answer with the full cache (one extra prefill each): adds \"quality\" (KL, top-1 agreement, first divergence) to every line.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Run on Ray Data: alone, a local Ray instance; with ADDRESS (host:port, ray://host:port or auto), "
                   "join that cluster. Needs: pip install 'kvchat[ray]'.")
@click.option("--workers", type=click.IntRange(1), default=None, help="With --ray: engine actors in the pool [default: 2].")
@click.option("--worker-cpus", type=click.IntRange(1), default=None, help="With --ray: CPUs (torch threads) per actor [default: the cluster's CPUs shared evenly].")
@click.pass_context
@user_errors
def batch(ctx, inp, out, batch_size, resume, summary_path, max_kv_bytes, progress, compare_full, ray_address, workers,
          worker_cpus, **local):
    """Generate for every line of a JSONL file; write one JSONL result line per input line, in order.

    \b
    Input lines: {"id": "q1", "prompt": "..."} or {"id": "q1", "messages": [...]}, optional system,
    max_new_tokens, temperature, top_p, top_k, seed, stop; OpenAI batch lines ({"custom_id", "body"}) too.
    A line that cannot run gets an error record in OUT; the run goes on.

    \b
    Exit codes:
      0    every line answered
      3    OUT is complete, but some lines are error records
      4    OUT is complete, but every line is an error record
      1, 2 nothing ran: a bad option, an unreadable IN, a model or profile error, or an OUT that
           --resume refuses (not a kvchat results file; it is left as it was)
      130  interrupted (Ctrl-C): OUT holds whole lines; run again with --resume
    With --resume, the lines an earlier run answered or failed count too.

    \b
    Examples:
      kvchat batch in.jsonl out.jsonl -p window --batch-size 8
      cat in.jsonl | kvchat batch - - -p window > out.jsonl
      kvchat batch in.jsonl out.jsonl --resume --summary summary.json
      kvchat batch in.jsonl out.jsonl -p window --compare-full
      kvchat batch in.jsonl out.jsonl -p razor --ray --workers 2
      kvchat batch in.jsonl out.jsonl -p razor --ray 10.0.0.1:6379 --workers 16 --worker-cpus 4
    """
    from kvchat.batch import run_batch

    opts = merged(ctx, local)
    if ray_address is not None:
        from kvchat.batch_ray import check_address, run_batch_ray

        if compare_full:
            raise click.UsageError("--compare-full does not run on --ray yet; drop one of them")
        summary = run_batch_ray(opts, inp, out, address=check_address(ray_address), workers=workers or 2,
                                worker_cpus=worker_cpus, batch_size=batch_size, resume=resume,
                                summary_path=summary_path, max_kv_bytes=max_kv_bytes, progress=progress)
        ctx.exit(summary["exit_code"])
    if workers is not None or worker_cpus is not None:
        raise click.UsageError("--workers and --worker-cpus size the Ray pool; add --ray (after IN OUT)")
    summary = run_batch(opts, inp, out, batch_size=batch_size, resume=resume, summary_path=summary_path,
                        max_kv_bytes=max_kv_bytes, progress=progress, compare_full=compare_full)
    ctx.exit(summary["exit_code"])


@main.command("eval")
@click.option("--model", "-m", default=None, help=f"Model: {EMBEDDED} (embedded, default), a local dir or a hub id. Env KVCHAT_MODEL.")
@click.option("--profile", "-p", "profiles", default=None, help="Comma list of shipped profile names or .yaml paths [default: every shipped profile].")
@click.option("--lengths", default="1024,2048", show_default=True, help="Prompt lengths in tokens for the retrieval tasks, comma separated.")
@click.option("--tasks", default="passkey,reassign", show_default=True, help="Retrieval tasks, comma separated: passkey, reassign, multikey (beyond the embedded 135M model).")
@click.option("--cases", type=click.IntRange(1), default=1, show_default=True, help="Cases per task and length (each its own seed).")
@click.option("--split", type=click.Choice(["heldout", "tuning"]), default="heldout", show_default=True, help="Seed range: held-out (1000+, for reporting) or tuning (0-999).")
@click.option("--text", "text", type=click.Path(dir_okay=False), default=None, help="Fidelity text file [default: Python's own documentation, pydoc_data].")
@click.option("--prefix-tokens", type=click.IntRange(16), default=1024, show_default=True, help="Fidelity: tokens of the text prefilled under the profile.")
@click.option("--scored-tokens", type=click.IntRange(0), default=128, show_default=True, help="Fidelity: tokens then teacher-forced one decode step at a time; 0 skips fidelity.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write every figure and case as JSON to this file.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Also draw accuracy against KV held to this PNG (needs kvchat[plot]).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="Where to run [default auto].")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default=None, help="Weights and KV dtype [default auto].")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr [default: when stderr is a terminal].")
@click.pass_context
@user_errors
def eval_(ctx, model, profiles, lengths, tasks, cases, split, text, prefix_tokens, scored_tokens, json_path, plot_path,
          device, dtype, progress):
    """Measure what each profile costs in quality: retrieval accuracy on generated tasks, and KL,
    top-1 agreement and perplexity against the full cache on a real text, beside the KV held.

    \b
    Examples:
      kvchat eval                                   # every shipped profile, held-out seeds, 1k and 2k tokens
      kvchat eval -p full,window,./mine.yaml --lengths 2048 --cases 4
      kvchat eval -p pyramid --split tuning --json tuning.json --plot frontier.png
      kvchat eval --text my_notes.txt --prefix-tokens 2048 --scored-tokens 256
    """
    from kvchat.quality import evaluate as ev

    opts = merged(ctx, {"model": model, "device": device, "dtype": dtype})
    if plot_path:
        from kvchat.quality.report import check_plot

        check_plot()
    settings = ev.Settings(lengths=ev.parse_lengths(lengths), tasks=ev.parse_tasks(tasks), cases=cases, split=split,
                           prefix=prefix_tokens, scored=scored_tokens, text=text)
    profs = ev.load_profiles(profiles or ctx.find_root().params.get("profile"))
    from kvchat.loading import quiet_transformers
    from kvchat.model import load_model

    quiet_transformers()
    lm = load_model(opts["model"], opts["device"], opts["dtype"], progress=lambda m: click.echo(m, err=True))
    ev.check_fits(settings, lm.desc.max_positions)
    run = ev.evaluate(lm, profs, settings, progress=progress)
    show_eval(run, json_path, plot_path)


def show_eval(run, json_path, plot_path) -> None:
    from kvchat.quality import report

    rec = run.record()
    if rec["profiles"]:
        click.echo(report.table(rec))
        click.echo(report.notes(rec))
        click.echo()
        click.echo(report.chart(rec["profiles"]))
    if json_path:
        report.write_json(json_path, rec)
        click.echo(f"wrote {json_path}", err=True)
    if plot_path and rec["profiles"]:
        report.write_png(plot_path, rec)
        click.echo(f"wrote {plot_path}", err=True)
    if run.interrupted:
        click.echo(f"kvchat eval: interrupted; {len(rec['profiles'])} profile(s) finished", err=True)
        raise click.exceptions.Exit(130)


@main.command()
@click.option("--model", "-m", default=None, help=f"Model to calibrate for [default {EMBEDDED}]. Env KVCHAT_MODEL.")
@click.option("--profile", "-p", default=None, help="Profile whose methods to calibrate. Env KVCHAT_PROFILE.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", help="Where to run [default auto].")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", help="Weights dtype [default auto].")
@click.option("--data", type=click.Path(dir_okay=False), default=None, help="Calibrate on this text or JSONL file instead of the default text (Python's own documentation), for methods that calibrate on text.")
@user_errors
def calibrate(model, profile, device, dtype, data):
    """Run (again) the calibrations a profile's methods need, and cache them under KVCHAT_HOME.

    Methods calibrate on first use anyway; this runs it ahead of time or refreshes it.

    \b
    Examples:
      kvchat calibrate -p razor
      kvchat calibrate -p razor -m ./my-llama
      kvchat calibrate -p kvsharer --data my-chats.jsonl
    """
    from kvchat.calibration import calibrate as run
    from kvchat.engine.probe import make_probe
    from kvchat.loading import quiet_transformers
    from kvchat.model import load_model
    from kvchat.profiles import load_profile

    prof = load_profile(profile or os.environ.get("KVCHAT_PROFILE") or "full")
    quiet_transformers()
    lm = load_model(model or os.environ.get("KVCHAT_MODEL") or EMBEDDED, device, dtype,
                    progress=lambda m: click.echo(m, err=True))
    done = 0
    probe = make_probe(lm, progress=lambda msg: click.echo(msg, err=True))
    for m in prof.methods:
        path = run(probe, m, data=data)
        if path is not None:
            done += 1
            click.echo(f"{m.name}: calibrated for {lm.desc.name} -> {path}")
            if hasattr(m, "calibration_note"):
                click.echo(m.calibration_note(lm.desc.name))
    if not done:
        click.echo(f"profile {prof.name} needs no calibration ({prof.describe()})")


@main.group()
def profiles():
    """List and inspect compression profiles."""


@profiles.command("list")
@user_errors
def profiles_list():
    """List the shipped profiles, one a line: name and summary.

    \b
    Example:
      kvchat profiles list
    """
    from kvchat.profiles import load_profile, shipped_names

    names = shipped_names()
    width = max(map(len, names))
    for n in names:
        click.echo(f"{n:<{width}}  {load_profile(n).summary}")


@profiles.command("show")
@click.argument("name")
@user_errors
def profiles_show(name):
    """Show a profile's YAML and the parsed methods with every parameter (defaults filled in).

    \b
    Examples:
      kvchat profiles show window
      kvchat profiles show ./my-profile.yaml
    """
    from pathlib import Path

    from kvchat.profiles import load_profile

    p = load_profile(name)
    click.echo(Path(p.source).read_text().rstrip())
    click.echo(f"# resolved: {p.describe()}")
    model = os.environ.get("KVCHAT_MODEL") or EMBEDDED
    for m in p.methods:  # what a calibrated method found for the default model (KVSharer's share map)
        if hasattr(m, "calibration_note"):
            click.echo(f"# {m.calibration_note(model)}")


if __name__ == "__main__":
    main()
