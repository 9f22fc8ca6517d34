"""Batch files: parse and validate JSONL request lines, write result lines whole, read OUT back for --resume.

Pure functions and small I/O helpers; `kvchat.batch` runs the requests through the engine.

A request line is `{"id", "prompt" | "messages", ...options}` or an OpenAI batch line
(`{"custom_id", "method", "url", "body": {"messages", "max_tokens", ...}}`). A line that cannot run becomes
an error record `{"id", "error": {"type": "invalid_request", "message": "line N: ..."}}` so the output keeps
one line per input line; a line without an id (or not JSON at all) is named by its line number.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field

# Per-line options a native line may carry (validated by `_check_option`).
OPTIONS = ("system", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop")
NATIVE_FIELDS = ("id", "prompt", "messages") + OPTIONS
OPENAI_FIELDS = ("custom_id", "method", "url", "body")
# OpenAI body keys we honour, mapped to ours; `model` is accepted and ignored (the run's --model decides).
OPENAI_BODY = {"messages": "messages", "max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
               "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed", "stop": "stop",
               "model": None, "n": None}
ROLES = ("system", "user", "assistant")


class LineError(Exception):
    """A request line that cannot run; the message is prefixed with the line number in the record."""


@dataclass
class Job:
    """One input line: either a runnable request or an error record waiting to be written."""

    index: int  # 0-based position in the input (the output order)
    line: int  # 1-based line number
    id: object  # as given (str or int); the line number when absent
    custom_id: bool = False  # OpenAI line: the output keeps "custom_id"
    messages: list[dict] | None = None  # None for a `prompt` line
    prompt: str | None = None
    options: dict = field(default_factory=dict)
    error: str | None = None

    def record(self) -> dict:
        head = {"id": self.id}
        if self.custom_id:
            head["custom_id"] = self.id
        return head

    def error_record(self, message: str | None = None) -> dict:
        msg = message if message is not None else self.error
        return {**self.record(), "error": {"type": "invalid_request", "message": f"line {self.line}: {msg}"}}


def id_key(rid) -> str:
    """Ids compare by their JSON form, so 5 and "5" are different ids."""
    return json.dumps(rid, ensure_ascii=False)


# ---- validation ----------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float))) and not isinstance(v, bool)


def _check_option(name: str, v):
    """-> the value normalized, or raise LineError naming the field and the value."""
    bad = f"{name!r} must be {{}}, got {json.dumps(v, ensure_ascii=False)[:60]}"
    if name == "system":
        if not isinstance(v, str):
            raise LineError(bad.format("a string"))
    elif name == "max_new_tokens":
        if not _is_int(v) or v < 1:
            raise LineError(bad.format("an integer >= 1"))
    elif name == "temperature":
        if not _is_num(v) or v < 0:
            raise LineError(bad.format("a number >= 0"))
    elif name == "top_p":
        if not _is_num(v) or not 0 < v <= 1:
            raise LineError(bad.format("a number in (0, 1]"))
    elif name == "top_k":
        if not _is_int(v) or v < 0:
            raise LineError(bad.format("an integer >= 0"))
    elif name == "seed":
        if not _is_int(v):
            raise LineError(bad.format("an integer"))
    elif name == "stop":
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise LineError(bad.format("a string or a list of strings"))
        v = tuple(s for s in v if s)
    return v


def _content(c, i: int) -> str:
    if isinstance(c, str):
        return c
    # OpenAI content parts: keep the text ones, refuse images and audio rather than drop them silently.
    if isinstance(c, list) and all(isinstance(p, dict) for p in c):
        kinds = {p.get("type") for p in c}
        if kinds <= {"text"} and all(isinstance(p.get("text"), str) for p in c):
            return "".join(p["text"] for p in c)
        raise LineError(f"messages[{i}].content has parts of type {sorted(map(str, kinds - {'text'}))}; only text is supported")
    raise LineError(f"messages[{i}].content must be a string, got {type(c).__name__}")


def check_messages(msgs) -> list[dict]:
    if not isinstance(msgs, list):
        raise LineError(f"'messages' must be a list, got {type(msgs).__name__}")
    if not msgs:
        raise LineError("'messages' is empty; give at least one message")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise LineError(f"messages[{i}] must be an object with 'role' and 'content', got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise LineError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {json.dumps(m.get('role'))}")
        out.append({"role": m["role"], "content": _content(m.get("content"), i)})
    return out


def _unknown(obj: dict, known, where: str = "") -> None:
    extra = [k for k in obj if k not in known]
    if extra:
        raise LineError(f"unknown field {where}{extra[0]!r} (known: {', '.join(k for k in known if k)})")


def _fill(job: Job, src: dict, fields) -> None:
    """Options from `src` (already restricted to known keys) into `job.options`, validated."""
    for k in fields:
        if k in src and src[k] is not None:
            ours = OPENAI_BODY.get(k, k) if job.custom_id else k
            if ours:
                job.options[ours] = _check_option(ours, src[k])


def _native(job: Job, obj: dict) -> None:
    _unknown(obj, NATIVE_FIELDS)
    if "id" in obj:
        if not (isinstance(obj["id"], str) or _is_int(obj["id"])):
            raise LineError(f"'id' must be a string or an integer, got {type(obj['id']).__name__}")
        job.id = obj["id"]
    if ("prompt" in obj) == ("messages" in obj):
        raise LineError("give exactly one of 'prompt' (a string) or 'messages' (a list)")
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise LineError(f"'prompt' must be a string, got {type(obj['prompt']).__name__}")
        if not obj["prompt"].strip():
            raise LineError("'prompt' is empty")
        job.prompt = obj["prompt"]
    else:
        job.messages = check_messages(obj["messages"])
    _fill(job, obj, OPTIONS)
    if "system" in job.options and job.messages and job.messages[0]["role"] == "system":
        raise LineError("give the system prompt as 'system' or as a first system message, not both")


def _openai(job: Job, obj: dict) -> None:
    _unknown(obj, OPENAI_FIELDS)
    cid = obj["custom_id"]
    if not (isinstance(cid, str) or _is_int(cid)):
        raise LineError(f"'custom_id' must be a string, got {type(cid).__name__}")
    job.id, job.custom_id = cid, True
    if obj.get("url", "/v1/chat/completions") != "/v1/chat/completions":
        raise LineError(f"'url' {obj['url']!r} is not supported; only /v1/chat/completions")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise LineError(f"'body' must be an object with 'messages', got {type(body).__name__}")
    _unknown(body, OPENAI_BODY, where="body.")
    if body.get("n", 1) != 1:
        raise LineError(f"body.n must be 1, got {json.dumps(body['n'])}")
    if "messages" not in body:
        raise LineError("body.messages is missing")
    job.messages = check_messages(body["messages"])
    _fill(job, body, [k for k in OPENAI_BODY if k != "messages"])


def parse_line(text: str, index: int, line: int) -> Job:
    """One input line -> a Job (with `error` set when the line cannot run)."""
    job = Job(index=index, line=line, id=line)
    if not text.strip():
        job.error = "empty line; expected a JSON object"
        return job
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        job.error = f"invalid JSON ({e.msg} at column {e.colno})"
        return job
    try:
        if not isinstance(obj, dict):
            raise LineError(f"expected a JSON object, got {type(obj).__name__}")
        (_openai if "custom_id" in obj else _native)(job, obj)
    except LineError as e:
        job.error = str(e)
    return job


def parse_lines(lines) -> list[Job]:
    """All input lines -> Jobs in order; a repeated id is an error on its later line (ids must be unique for
    --resume to know what is done)."""
    jobs, first = [], {}
    for i, text in enumerate(lines):
        job = parse_line(text, i, i + 1)
        k = id_key(job.id)
        if k in first and job.error is None:
            job.error = f"duplicate id {json.dumps(job.id, ensure_ascii=False)} (first on line {first[k]})"
        first.setdefault(k, job.line)
        jobs.append(job)
    return jobs


def derive_seed(run_seed: int, rid) -> int:
    """A request's seed from the run's --seed and its id: the same whatever the batch size or order."""
    h = hashlib.sha256(f"{run_seed}:{id_key(rid)}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


# ---- sizes ---------------------------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_bytes(s: str) -> int:
    """'2GiB', '500MB', '1.5 gb', '1000000' -> bytes. ValueError with the accepted form otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(s))
    unit = m and m.group(2).lower()
    if not m or unit not in _UNITS:
        raise ValueError(f"{s!r} is not a size; use bytes or a number with a unit, e.g. 1000000, 500MB, 2GiB")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"{s!r} must be more than 0 bytes")
    return n


# ---- output --------------------------------------------------------------------------------------------
def encode_record(rec: dict) -> bytes:
    return (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")


def write_all(f, data: bytes) -> None:
    """One line, whole: a single write (looping only if the OS takes part of it), then flush."""
    view = memoryview(data)
    while view:
        n = f.write(view)
        view = view[n if n is not None else len(view):]
    f.flush()


def read_done(path: str) -> set[str]:
    """Ids (as `id_key`) of the complete lines of an existing OUT; a partial last line (a killed run) is
    truncated away so appending starts on a line boundary."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            f.truncate(end)
    done = set()
    for n, raw in enumerate(data[:end].splitlines(), 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            done.add(id_key(rec["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path} line {n} is not a kvchat result line; fix or remove it, or run without --resume") from None
    return done


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
