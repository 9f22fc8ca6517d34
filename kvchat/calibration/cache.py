"""Where calibrations live: KVCHAT_HOME/calibrations/<model>/<kind>-<hash of the parameters>.json."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from kvchat.model import kvchat_home


def model_key(name: str) -> str:
    """A directory name for a model: hub ids keep their name, local paths get a hash so two dirs differ."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "--", name.strip("/"))
    if os.sep in name and Path(name).expanduser().exists():
        base = f"{Path(name).name}-{hashlib.sha1(str(Path(name).resolve()).encode()).hexdigest()[:8]}"
    return base


def cache_path(model_name: str, kind: str, params: dict) -> Path:
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return kvchat_home() / "calibrations" / model_key(model_name) / f"{kind}-{digest}.json"


def write_json(path: Path, data: dict) -> None:
    """Atomic write: a crash leaves the old file or none, never half a calibration."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
