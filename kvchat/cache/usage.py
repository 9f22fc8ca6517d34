"""What the REPL, batch mode and benchmarks report about KV memory: one dataclass, one formula.

Every caller reads bytes through `Engine.usage(slot)` / `Engine.run_usage()`, never the store itself,
so "saved" is computed in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass


def saved(held: int, full: int) -> float:
    """Share of an uncompressed cache's bytes not held, in [0, 1]. Holding more than a full cache (block
    rounding and position indices on short sequences) is overhead, reported by `overhead`, not a
    negative saving."""
    return round(max(0.0, 1 - held / full), 4) if full else 0.0


def overhead(held: int, full: int) -> float:
    """Share by which the bytes held exceed an uncompressed cache's (0 when they don't)."""
    return round(max(0.0, held / full - 1), 4) if full else 0.0


@dataclass(frozen=True)
class Usage:
    """KV bytes of one sequence (or of a whole run): held now, what a full cache would hold now, and
    the peaks of both. `seen` is tokens processed (what a full cache would hold per layer)."""

    held: int
    full: int
    peak_held: int
    peak_full: int
    seen: int = 0

    @property
    def saved(self) -> float:
        return saved(self.held, self.full)

    @property
    def overhead(self) -> float:
        return overhead(self.held, self.full)

    def record(self, profile: str) -> dict:
        """The `kv` object of a batch result line."""
        return {"profile": profile, "bytes_held": self.held, "bytes_full": self.full, "saved": self.saved,
                "overhead": self.overhead, "peak_bytes_held": self.peak_held, "peak_bytes_full": self.peak_full}
