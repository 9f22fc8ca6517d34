"""Where calibrations live: KVCHAT_HOME/calibrations/<model>/<kind>-<hash of the parameters>.{json,safetensors}.

Results are JSON (head lists, share maps) or tensors (low-rank factors, as safetensors with the
parameters in its metadata), keyed by model and parameters, and always written atomically: a crash
leaves the old file or none, never half a calibration.

The process remembers which calibration files it read or wrote, so a run can ship them: `bundle()` after
the engine has bound its methods, `install(files)` in another process (a Ray worker) before it binds.
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


# Calibration files this process used (read or written) and the ones it computed; see bundle().
_used: set[Path] = set()
_computed: set[Path] = set()


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
    _used.add(path)
    _computed.add(path)


def write_tensors(path: Path, tensors: dict, meta: dict) -> None:
    """Tensors (contiguous CPU copies are written) with `meta` (JSON) in the safetensors header."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(cpu, tmp, metadata={"kvchat": json.dumps(meta)}))
    _used.add(path)
    _computed.add(path)


def read_tensors(path: Path) -> tuple[dict, dict] | None:
    """-> (tensors, meta), or None when the file is missing or unreadable (then it is recomputed)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("kvchat", "{}"))
            got = {k: f.get_tensor(k) for k in f.keys()}, meta
    except (OSError, ValueError, RuntimeError, SafetensorError):
        return None
    _used.add(path)
    return got


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    _used.add(path)
    return data


# ---- shipping to other processes -----------------------------------------------------------------------
def computed() -> int:
    """How many calibration files this process computed (wrote) so far."""
    return len(_computed)


def bundle() -> dict[str, bytes]:
    """{path under KVCHAT_HOME: bytes} of every calibration file this process used and that still exists."""
    home = kvchat_home()
    out = {}
    for path in sorted(_used):
        try:
            out[str(path.relative_to(home))] = path.read_bytes()
        except (OSError, ValueError):  # gone, or outside this home (KVCHAT_HOME changed mid-run)
            continue
    return out


def install(files: dict[str, bytes]) -> int:
    """Write a bundle under this process's KVCHAT_HOME (atomically, skipping identical files) so methods
    read their calibration instead of computing it; -> files written."""
    home = kvchat_home()
    n = 0
    for rel, data in files.items():
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or len(parts) < 2 or parts[0] != "calibrations":
            raise ValueError(f"calibration bundle entry {rel!r} is not a file under calibrations/")
        path = home / rel
        try:
            if path.read_bytes() == data:
                continue
        except OSError:
            pass

        def dump(tmp, data=data):
            with open(tmp, "wb") as f:
                f.write(data)

        _atomic(path, dump)
        n += 1
    return n
