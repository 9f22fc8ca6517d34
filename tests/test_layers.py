"""Imports point down only: each kvchat module imports kvchat modules of its own layer or below.

The layers, top to bottom (DESIGN.md's list; `methods` sits above `cache` because formats are methods
built on the store's pools, and `model` sits low because calibrations key their cache by it):
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "kvchat"

LAYERS = [  # top first; a module may import its own layer and those after it
    ["kvchat.cli"],
    ["kvchat.repl"],
    ["kvchat.batch_ray"],
    ["kvchat.commands", "kvchat.batch", "kvchat.loading"],
    ["kvchat.session", "kvchat.batch_io", "kvchat.batch_output", "kvchat.stats", "kvchat.templating", "kvchat.quality"],
    ["kvchat.engine"],
    ["kvchat.profiles"],
    ["kvchat.methods"],
    ["kvchat.cache"],
    ["kvchat.calibration"],
    ["kvchat.model"],
    ["kvchat.errors", "kvchat"],
]


def rank(module: str) -> int:
    """The layer of a kvchat module: its longest listed prefix."""
    best, at = None, -1
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and len(n) > at:
                best, at = i, len(n)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")
    return best


def modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield ".".join(parts), path


def kvchat_imports(path: Path, module: str) -> list[str]:
    """Every kvchat module `path` imports, at any depth (imports inside functions count too)."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name == "kvchat" or a.name.startswith("kvchat.")]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{module}: use absolute imports, so this check sees every dependency"
            name = node.module or ""
            if name == "kvchat" or name.startswith("kvchat."):
                out.append(name)
    return out


@pytest.mark.parametrize("module,path", list(modules()), ids=lambda x: x if isinstance(x, str) else "")
def test_imports_point_down(module, path):
    me = rank(module)
    for imp in kvchat_imports(path, module):
        if imp == "kvchat":  # the package root only sets up the environment
            continue
        assert rank(imp) >= me, f"{module} (layer {me}) imports {imp} (layer {rank(imp)}): imports must point down"


def test_the_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from kvchat.cli import main\n")
    with pytest.raises(AssertionError, match="imports must point down"):
        test_imports_point_down("kvchat.methods.x", bad)
