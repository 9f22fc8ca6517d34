"""Where calibrations live: KVCHAT_HOME/calibrations/<model>/<kind>-<hash of the parameters>.{json,safetensors}.

Results are JSON (head lists, share maps) or tensors (low-rank factors, as safetensors with the
parameters in its metadata), keyed by model and parameters, and always written atomically: a crash
leaves the old file or none, never half a calibration.
"""

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


def cache_path(model_name: str, kind: str, params: dict, suffix: str = ".json") -> Path:
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return kvchat_home() / "calibrations" / model_key(model_name) / f"{kind}-{digest}{suffix}"


def _atomic(path: Path, write) -> None:
    """`write(tmp_path)` into a temporary sibling, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, data: dict) -> None:
    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)

    _atomic(path, dump)


def write_tensors(path: Path, tensors: dict, meta: dict) -> None:
    """Tensors (contiguous CPU copies are written) with `meta` (JSON) in the safetensors header."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(cpu, tmp, metadata={"kvchat": json.dumps(meta)}))


def read_tensors(path: Path) -> tuple[dict, dict] | None:
    """-> (tensors, meta), or None when the file is missing or unreadable (then it is recomputed)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("kvchat", "{}"))
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (OSError, ValueError, RuntimeError, SafetensorError):
        return None


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
