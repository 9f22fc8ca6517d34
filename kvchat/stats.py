"""Formatting what the compression did: one-line summaries and the per-layer bar chart of tokens kept."""

from __future__ import annotations

BLOCKS = " ▏▎▍▌▋▊▉█"


def human_bytes(n: float) -> str:
    """kvchat's one unit for sizes everywhere it prints them: binary (1 MiB = 2**20 bytes)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def kv_share(saved: float, overhead: float) -> str:
    """'41% saved', or '12% overhead' when a short sequence holds more than a full cache would (a partly
    filled block per layer and head, and position indices): never a negative saving."""
    return f"{overhead:.0%} overhead" if overhead > 0 else f"{saved:.0%} saved"


def kv_line(held: int, full: int, saved: float, overhead: float) -> str:
    return f"KV {human_bytes(held)} held vs {human_bytes(full)} full ({kv_share(saved, overhead)})"


def bar(value: float, top: float, width: int = 32) -> str:
    """A horizontal bar of `width` cells with eighth-cell resolution."""
    if top <= 0:
        return ""
    eighths = round(max(0.0, min(1.0, value / top)) * width * 8)
    full, rest = divmod(eighths, 8)
    return "█" * full + (BLOCKS[rest] if rest else "")


def layer_chart(kept: list[list[int]], seen: int, width: int = 32) -> list[str]:
    """One line per layer: a bar of the mean tokens kept per KV head (scaled to the tokens seen), the
    per-head counts when heads differ (RazorAttention), and the share of a full cache."""
    lines = []
    top = max(seen, max((max(h) for h in kept if h), default=0), 1)
    for i, heads in enumerate(kept):
        mean = sum(heads) / len(heads) if heads else 0
        ragged = len(set(heads)) > 1
        detail = "/".join(str(h) for h in heads) if ragged else str(heads[0] if heads else 0)
        lines.append(f"L{i:02d} {bar(mean, top, width):<{width}} {detail:>12}  {mean / top:>4.0%}")
    return lines


def turn_line(result) -> str:
    """The dim line after each answer."""
    kv = result.kv
    return (f"{result.completion_tokens} tok · {result.timing['decode_tokens_per_s']:.1f} tok/s decode · "
            + kv_line(kv["bytes_held"], kv["bytes_full"], kv["saved"], kv["overhead"]))


def prefill_progress(write, at_least: int = 1024):
    """An `on_progress(done, total)` that shows how far a long prompt has been read, on one line that is
    erased when reading ends (short prompts show nothing: they take under a second or two)."""
    shown = {"on": False}

    def show(done: int, total: int) -> None:
        if total < at_least:
            return
        if done >= total:
            if shown["on"]:
                write("\r\033[K")
                shown["on"] = False
            return
        write(f"\r[reading {total:,} tokens: {done / total:.0%} · Ctrl-C stops]")
        shown["on"] = True

    return show
