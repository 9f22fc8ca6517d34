"""Profiles: YAML files naming a list of methods and their parameters, validated into a `Profile`.

    name: pyramid
    summary: one line
    paper: https://...
    methods:
      - pyramidinfer: {recent_ratio: 0.2, decay: 0.8}
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kvchat.errors import ProfileError
from kvchat.methods import REGISTRY, Method

TOP_KEYS = {"name", "summary", "paper", "methods"}
# A profile is a few lines. PyYAML reads ~55 KB/s, so a huge file would keep kvchat busy for minutes.
MAX_BYTES = 16 * 1024
MAX_METHODS = 16


@dataclass
class Profile:
    name: str
    summary: str = ""
    paper: str = ""
    methods: list[Method] = field(default_factory=list)
    source: str = ""

    def describe(self) -> str:
        parts = [f"{m.name}({', '.join(f'{k}={getattr(m, k)}' for k in m.params())})" for m in self.methods]
        return " + ".join(parts) or "full cache"


def shipped_dir() -> Path:
    return Path(str(importlib.resources.files("kvchat_profiles")))


def shipped_names() -> list[str]:
    return sorted(p.stem for p in shipped_dir().glob("*.yaml"))


def _where(src: str) -> str:
    return f"profile {src}"


def build_method(key: str, params, src: str) -> Method:
    cls = REGISTRY.get(key)
    if cls is None:
        raise ProfileError(f"{_where(src)}: unknown method {key!r}; known methods: {', '.join(sorted(REGISTRY))}")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ProfileError(f"{_where(src)}: parameters of {key} must be a mapping, got {params!r}")
    allowed = cls.params()
    for k in params:
        if k not in allowed:
            raise ProfileError(f"{_where(src)}: unknown key {key}.{k}; {key} accepts {', '.join(allowed) or 'no keys'}")
    try:
        return cls(**params)
    except ProfileError as e:
        raise ProfileError(f"{_where(src)}: {e}") from None


def parse_profile(data, src: str) -> Profile:
    if not isinstance(data, dict):
        raise ProfileError(f"{_where(src)}: expected a mapping with name and methods, got {type(data).__name__}")
    for k in data:
        if k not in TOP_KEYS:
            raise ProfileError(f"{_where(src)}: unknown key {k!r}; a profile has {', '.join(sorted(TOP_KEYS))}")
    name = data.get("name") or Path(src).stem
    methods_raw = data.get("methods") or []
    if not isinstance(methods_raw, list):
        raise ProfileError(f"{_where(src)}: 'methods' must be a list of {{method: {{params}}}}, got {str(methods_raw)[:80]}")
    if len(methods_raw) > MAX_METHODS:
        raise ProfileError(f"{_where(src)}: 'methods' lists {len(methods_raw):,} methods; a profile composes at most {MAX_METHODS}")
    methods = []
    for item in methods_raw:
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            raise ProfileError(f"{_where(src)}: each entry of 'methods' must be one {{method: {{params}}}}, got {item!r}")
        (key, params), = item.items()
        methods.append(build_method(key, params, src))
    return Profile(name=str(name), summary=str(data.get("summary", "")), paper=str(data.get("paper", "")),
                   methods=methods, source=src)


def load_profile(name_or_path: str) -> Profile:
    """A shipped profile by name, or a YAML file by path."""
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise ProfileError(f"profile file {name_or_path!r} does not exist")
        path = p
    else:
        path = shipped_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ProfileError(
                f"unknown profile {name_or_path!r}; shipped profiles: {', '.join(shipped_names())} (or give a path to a .yaml)"
            )
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise ProfileError(f"profile {path} is {size:,} bytes; a profile is a few lines (at most {MAX_BYTES:,} bytes)")
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ProfileError(f"profile {path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ProfileError(f"profile {path}: not UTF-8 (byte {e.start:,})") from None
    except yaml.YAMLError as e:
        raise ProfileError(f"profile {path}: invalid YAML ({str(e).splitlines()[0]})") from None
    return parse_profile(data, str(path))


def fresh(profile: Profile) -> Profile:
    """A copy with new method instances (methods hold per-conversation state)."""
    return dataclasses.replace(profile, methods=[dataclasses.replace(m) for m in profile.methods])
