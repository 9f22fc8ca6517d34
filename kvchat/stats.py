"""Formatting what the compression did: one-line summaries and the per-layer bar chart of tokens kept."""

from __future__ import annotations

BLOCKS = " ▏▎▍▌▋▊▉█"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def saved_pct(held: int, full: int) -> str:
    return f"{(1 - held / full) * 100:.0f}%" if full else "n/a"


def bar(value: float, top: float, width: int = 32) -> str:
    """A horizontal bar of `width` cells with eighth-cell resolution."""
    if top <= 0:
        return ""
    eighths = round(max(0.0, min(1.0, value / top)) * width * 8)
    full, rest = divmod(eighths, 8)
    return "█" * full + (BLOCKS[rest] if rest else "")


def layer_chart(kept: list[list[int]], seen: int, width: int = 32, aliases: dict[int, int] | None = None) -> list[str]:
    """One line per layer: a bar of the mean tokens kept per KV head (scaled to the tokens seen), the
    per-head counts when heads differ (RazorAttention), and the share of a full cache. A layer in
    `aliases` (KVSharer: it reads an earlier layer's cache and holds none) says which layer it reads."""
    lines = []
    top = max(seen, max((max(h) for h in kept if h), default=0), 1)
    for i, heads in enumerate(kept):
        if aliases and i in aliases:
            lines.append(f"L{i:02d} -> L{aliases[i]:02d} (shared: reads its KV cache, holds none)")
            continue
        mean = sum(heads) / len(heads) if heads else 0
        ragged = len(set(heads)) > 1
        detail = "/".join(str(h) for h in heads) if ragged else str(heads[0] if heads else 0)
        lines.append(f"L{i:02d} {bar(mean, top, width):<{width}} {detail:>12}  {mean / top:>4.0%}")
    return lines


def turn_line(result) -> str:
    """The dim line after each answer."""
    kv = result.kv
    return (f"{result.completion_tokens} tok · {result.timing['tokens_per_s']:.1f} tok/s · "
            f"KV {human_bytes(kv['bytes_held'])} held vs {human_bytes(kv['bytes_full'])} full "
            f"({saved_pct(kv['bytes_held'], kv['bytes_full'])} saved)")
