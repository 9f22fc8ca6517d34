"""Filler text for the retrieval tasks, from text Python ships: nothing to download, nothing we wrote.

Four kinds, each a list of units (paragraphs, sentences or lines) and the string that joins them:
    prose      paragraphs of the language reference (`pydoc_data.topics`)
    sentences  a few aphorisms of the Zen of Python (`this.py`, read, not imported), repeated
    lists      numbered lines of Unicode character names (`unicodedata`): lists full of numbers
    code       lines of standard-library modules' source
The text differs between Python versions, so a seed gives the same case on the same interpreter.
"""

from __future__ import annotations

import codecs
import functools
import importlib.util
import random
import re
import unicodedata
from pathlib import Path

FILLERS = ("prose", "sentences", "lists", "code")
JOINERS = {"prose": "\n\n", "sentences": " ", "lists": "\n", "code": "\n"}

# Pure-Python modules every CPython 3.10+ ships; a missing one is skipped.
CODE_MODULES = ("argparse", "textwrap", "difflib", "heapq", "bisect", "calendar", "fractions", "statistics",
                "shlex", "csv", "json.decoder", "dataclasses", "functools", "pprint", "configparser", "inspect",
                "string", "tokenize", "gettext", "ipaddress")


def _text_of(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return ""
    return Path(spec.origin).read_text(encoding="utf-8", errors="replace")


@functools.lru_cache(maxsize=None)
def doc_text() -> str:
    """Python's reference documentation as one text (the default for fidelity): ~113k tokens."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@functools.lru_cache(maxsize=None)
def _prose() -> tuple[str, ...]:
    """Paragraphs of running text: unindented, no headings, at least two sentences; each once (topics
    repeat some paragraphs)."""
    out: dict[str, None] = {}
    for para in re.split(r"\n\s*\n", doc_text()):
        lines = para.split("\n")
        if any(l.startswith(" ") or set(l) <= set("*=-^~ ") for l in lines):
            continue
        text = " ".join(l.strip() for l in lines)
        if text.count(". ") >= 1 and text.endswith(".") and len(text) > 120:
            out[text] = None
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _zen() -> tuple[str, ...]:
    src = _text_of("this")
    m = re.search(r's = """(.*?)"""', src, re.S)
    lines = codecs.decode(m.group(1), "rot13").split("\n") if m else []
    return tuple(l.strip() for l in lines[2:] if l.strip())  # skip the title line


@functools.lru_cache(maxsize=None)
def _named_chars() -> tuple[str, ...]:
    out = []
    for cp in range(0x20, 0x30000):
        name = unicodedata.name(chr(cp), "")
        if name and not name.startswith(("CJK UNIFIED", "CJK COMPATIBILITY IDEOGRAPH", "TANGUT", "HANGUL SYLLABLE")):
            out.append(f"{cp}: {name.lower()}")
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _code_lines() -> tuple[tuple[str, ...], ...]:
    out = []
    for mod in CODE_MODULES:
        lines = [l.rstrip() for l in _text_of(mod).split("\n")]
        if len(lines) > 200:
            out.append(tuple(lines))
    return tuple(out)


def units(kind: str, rng: random.Random, n_chars: int) -> list[str]:
    """At least `n_chars` characters of `kind` filler as units, starting where `rng` says."""
    if kind == "prose":
        pool = _prose()
    elif kind == "sentences":
        zen = _zen()
        pool = tuple(rng.sample(zen, min(4, len(zen))))  # a few short sentences, repeated
    elif kind == "lists":
        pool = _named_chars()
    elif kind == "code":
        files = _code_lines()
        pool = files[rng.randrange(len(files))]
    else:
        raise ValueError(f"unknown filler {kind!r}; fillers: {', '.join(FILLERS)}")
    if not pool:
        raise RuntimeError(f"no {kind} filler text found in this Python installation")
    i = 0 if kind == "sentences" else rng.randrange(len(pool))
    out, size = [], 0
    while size < n_chars:
        out.append(pool[i % len(pool)])
        size += len(out[-1]) + 1
        i += 1
    return out
