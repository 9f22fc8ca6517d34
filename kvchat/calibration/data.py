"""Calibration text: by default text that needs no download and that we did not write (Python's own
documentation, `pydoc_data.topics`, shipped with CPython: ~113k tokens of prose and code for SmolLM2's
tokenizer); or the user's file (`kvchat calibrate --data FILE`): plain text, or JSONL whose lines carry
"text", "prompt" or "messages" (a batch input file works).

`samples(tokenizer, n, tokens, seed, data)` draws n windows of `tokens` token ids from it, deterministic
for a seed; `data_key(data)` names the data in a calibration's cache key, so other data is another cache.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from kvchat.errors import KvchatError


def default_text() -> str:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def _jsonl_text(lines: list[str], path: str) -> str:
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise KvchatError(f"--data {path} line {n} is not JSON ({e.msg}); give plain text or JSONL") from None
        if not isinstance(obj, dict):
            raise KvchatError(f"--data {path} line {n}: expected an object with text, prompt or messages")
        if isinstance(obj.get("text"), str):
            out.append(obj["text"])
        elif isinstance(obj.get("prompt"), str):
            out.append(obj["prompt"])
        elif isinstance(obj.get("messages"), list):
            out += [m["content"] for m in obj["messages"] if isinstance(m, dict) and isinstance(m.get("content"), str)]
        else:
            raise KvchatError(f"--data {path} line {n}: no 'text', 'prompt' or 'messages' to calibrate on")
    return "\n\n".join(out)


def read_text(data: str | None) -> str:
    """The calibration corpus: the default text, or the file `data`."""
    if data is None:
        return default_text()
    p = Path(data).expanduser()
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KvchatError(f"--data {data}: cannot read it as UTF-8 text ({getattr(e, 'strerror', None) or e})") from None
    lines = raw.splitlines()
    first = next((l for l in lines if l.strip()), "")
    text = _jsonl_text(lines, data) if p.suffix == ".jsonl" or first.lstrip().startswith("{") else raw
    if not text.strip():
        raise KvchatError(f"--data {data} holds no text to calibrate on")
    return text


def data_key(data: str | None) -> str:
    """'pydoc' for the default text, else a hash of the file's bytes (edits make a new calibration)."""
    if data is None:
        return "pydoc"
    try:
        return "file-" + hashlib.sha1(Path(data).expanduser().read_bytes()).hexdigest()[:12]
    except OSError:
        raise KvchatError(f"--data {data}: no such file") from None


def samples(tokenizer, n: int, tokens: int, seed: int, data: str | None = None) -> list[list[int]]:
    """n windows of `tokens` consecutive token ids from the corpus, at seeded random offsets."""
    ids = tokenizer(read_text(data), add_special_tokens=False)["input_ids"]
    if len(ids) < tokens:
        raise KvchatError(f"the calibration text has {len(ids):,} tokens; {tokens:,} per sample are needed "
                          "(give more text with --data, or fewer tokens)")
    return [ids[s : s + tokens] for s in window_starts(len(ids), n, tokens, seed)]


def window_starts(n_ids: int, n: int, tokens: int, seed: int) -> list[int]:
    """Where `samples` cuts its n windows from a corpus of n_ids tokens (evaluations stay clear of them)."""
    rng = random.Random(seed)
    return [rng.randrange(0, n_ids - tokens + 1) for _ in range(n)]
