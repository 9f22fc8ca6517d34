"""`kvchat eval`'s outputs: the table, the terminal chart of accuracy against held share, JSON, PNG."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from kvchat.errors import KvchatError

MARKS = "123456789abcdefghijklmnopqrstuvwxyz"


def _pct(x) -> str:
    return "-" if x is None else f"{x:.0%}"


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table(record: dict) -> str:
    """A Markdown table, one row per profile (readable as is in a terminal)."""
    s = record["settings"]
    longest = str(max(s["lengths"]))
    head = (["profile", "held", "held end"] + list(s["tasks"]) +
            ["KL", "top-1", "ppl", f"prefill s @{longest}", "decode tok/s"])
    rows = []
    for r in record["profiles"]:
        rows.append([r["profile"], _pct(r["held_prefill"]), _pct(r["held_end"])] +
                    [_pct(r["accuracy"][t]) for t in s["tasks"]] +
                    [_num(r["kl"], ".4f"), _num(r["top1"], ".1%"), _num(r["ppl"], ".2f"),
                     _num(r["prefill_s"][longest], ".2f"), _num(r["decode_tok_s"], ".1f")])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def notes(record: dict) -> str:
    """What the table's columns were measured on, in two lines."""
    s, seeds = record["settings"], record["seeds"]
    n = len(seeds)
    line1 = (f"accuracy: {n} case{'s' if n != 1 else ''} per task ({s['split']} seeds {seeds[0]}-{seeds[-1]}, "
             f"{', '.join(map(str, s['lengths']))} tokens); held: KV held / full after the prompts' prefill")
    line2 = (f"fidelity vs full on {s['text']}: {s['prefix']} tokens prefilled, {s['scored']} teacher-forced "
             "(KL nats/token, top-1 agreement, perplexity); held end: after them" if s["scored"] else
             "fidelity: off (--scored-tokens 0); held end: after the retrieval answers")
    return line1 + "\n" + line2


def frontier(rows: list[dict]) -> set[str]:
    """Profiles no other profile beats on both axes (holds less and answers at least as well)."""
    out = set()
    for r in rows:
        h, a = r["held_prefill"], r["accuracy_mean"]
        if not any(o is not r and o["held_prefill"] <= h and o["accuracy_mean"] >= a and
                   (o["held_prefill"] < h or o["accuracy_mean"] > a) for o in rows):
            out.add(r["profile"])
    return out


def chart(rows: list[dict], width: int = 52, height: int = 10) -> str:
    """Accuracy (mean over tasks) against KV held after prefill, one mark per profile."""
    if not rows:
        return ""
    top_x = max(1.0, max(r["held_prefill"] for r in rows))
    grid = [[" "] * (width + 1) for _ in range(height + 1)]
    for i, r in enumerate(rows):
        x = round(r["held_prefill"] / top_x * width)
        y = height - round(r["accuracy_mean"] * height)
        cell = grid[y][x]
        grid[y][x] = MARKS[i % len(MARKS)] if cell == " " else "*"  # '*': several profiles in one cell
    lines = []
    for y, row in enumerate(grid):
        label = f"{(height - y) / height:>4.0%} |" if y % (height // 2) == 0 else "     |"
        lines.append(label + "".join(row).rstrip())
    lines.append("     +" + "-" * (width + 1))
    lines.append(f"      0%{'KV held after prefill (share of full)':^{width - 8}}{top_x:.0%}")
    best = frontier(rows)
    legend = [f"{MARKS[i % len(MARKS)]} {r['profile']}{' (frontier)' if r['profile'] in best else ''}"
              for i, r in enumerate(rows)]
    return "accuracy (mean over tasks)\n" + "\n".join(lines) + "\n      " + "   ".join(legend)


@contextmanager
def _atomic(path: str, suffix: str = ""):
    """A temporary file beside `path`, renamed onto it only when writing it succeeded."""
    p = Path(path).expanduser()
    try:
        fd, tmp = tempfile.mkstemp(dir=p.parent if str(p.parent) else ".", prefix=f".{p.name}.", suffix=suffix)
    except OSError as e:
        raise KvchatError(f"cannot write {path}: {e.strerror}") from None
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str, record: dict) -> None:
    with _atomic(path) as tmp, open(tmp, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")


def check_plot() -> None:
    """Fail before the run, not after it, when --plot cannot be honoured."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise KvchatError("--plot needs matplotlib: pip install 'kvchat[plot]' (or leave out --plot)") from None


def write_png(path: str, record: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["profiles"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.scatter([r["held_prefill"] for r in rows], [r["accuracy_mean"] for r in rows], color="tab:blue", zorder=3)
    for r in rows:
        ax.annotate(r["profile"], (r["held_prefill"], r["accuracy_mean"]), textcoords="offset points", xytext=(5, 4))
    best = sorted((r for r in rows if r["profile"] in frontier(rows)), key=lambda r: r["held_prefill"])
    ax.step([r["held_prefill"] for r in best], [r["accuracy_mean"] for r in best], where="post", color="tab:orange",
            alpha=0.6, label="frontier")
    ax.set_xlabel("KV held after prefill (share of full)")
    ax.set_ylabel("retrieval accuracy (mean over tasks)")
    ax.set_xlim(0, max(1.05, max(r["held_prefill"] for r in rows) + 0.05))
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title(f"{record['model']}: accuracy vs KV held ({record['settings']['split']} seeds)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    with _atomic(path, suffix=Path(path).suffix or ".png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
