"""Calibrations some methods need before they run, cached per model under `KVCHAT_HOME/calibrations/`.

`calibrate(probe, method)` is what `kvchat calibrate -p PROFILE` calls for each method of a profile: it
(re)computes that method's calibration and returns the cache file, or None when the method needs none.
Methods also call their calibration lazily in `bind`, reading the cache when it exists. A calibration
runs the model only through the `probe` the engine hands over (kvchat/engine/probe.py): this package
imports nothing above it.
"""

from __future__ import annotations

from pathlib import Path

from kvchat.calibration.cache import cache_path
from kvchat.calibration.razor import retrieval_heads, score_heads


def calibrate(probe, method, force: bool = True, data: str | None = None) -> Path | None:
    """Run `method`'s calibration on the probe's model (recomputing when `force`), on the default text or
    the file `data` when the method calibrates on text; -> cache file, or None if it needs none."""
    run = getattr(method, "calibrate", None)
    if run is None:
        return None
    if data is not None and hasattr(method, "data"):
        method.data = data
    return run(probe, force=force)


__all__ = ["cache_path", "calibrate", "retrieval_heads", "score_heads"]
