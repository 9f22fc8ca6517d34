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
import math
import os
import re
from dataclasses import dataclass, field

from kvchat.errors import MessageError
from kvchat.templating import check_messages, check_text

# Per-line options a native line may carry (validated by `_check_option`).
OPTIONS = ("system", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop")
NATIVE_FIELDS = ("id", "prompt", "messages") + OPTIONS
OPENAI_FIELDS = ("custom_id", "method", "url", "body")
# OpenAI body keys we honour, mapped to ours; `model` is accepted and ignored (the run's --model decides).
OPENAI_BODY = {"messages": "messages", "max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
               "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed", "stop": "stop",
               "model": None, "n": None}


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
    # JSON's NaN and Infinity parse to floats; no option means anything by them.
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def _check_option(name: str, v):
    """-> the value normalized, or raise LineError naming the field and the value."""
    shown = json.dumps(v, ensure_ascii=False)[:60]

    def bad(what: str) -> LineError:  # not str.format: the value shown may hold braces
        return LineError(f"{name!r} must be {what}, got {shown}")

    if name == "system":
        check_text("'system'", v)
    elif name == "max_new_tokens":
        if not _is_int(v) or v < 1:
            raise bad("an integer >= 1")
    elif name == "temperature":
        if not _is_num(v) or v < 0:
            raise bad("a number >= 0")
    elif name == "top_p":
        if not _is_num(v) or not 0 < v <= 1:
            raise bad("a number in (0, 1]")
    elif name == "top_k":
        if not _is_int(v) or v < 0:
            raise bad("an integer >= 0")
    elif name == "seed":
        if not _is_int(v) or not SEED_RANGE[0] <= v <= SEED_RANGE[1]:
            raise bad("an integer in [-2**63, 2**64)")
    elif name == "stop":
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise bad("a string or a list of strings")
        v = tuple(s for s in v if s)
    return v


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
        check_text("'prompt'", obj["prompt"])
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


@dataclass(frozen=True)
class Undecodable:
    """An input line that is not UTF-8: it keeps its place and becomes an error record."""

    message: str


def split_lines(data: bytes) -> list[str | Undecodable]:
    """A JSONL file's bytes -> its lines, each decoded on its own so one bad byte costs one line."""
    bom = b"\xef\xbb\xbf" if data.startswith(b"\xef\xbb\xbf") else b""  # Windows editors; not part of line 1
    raw = data[len(bom):].split(b"\n")
    if raw and raw[-1] == b"":  # the newline ending the last line does not start another one
        raw.pop()
    lines, offset = [], len(bom)
    for r in raw:
        try:
            lines.append(r.removesuffix(b"\r").decode("utf-8"))
        except UnicodeDecodeError as e:
            lines.append(Undecodable(f"not UTF-8: byte 0x{r[e.start]:02x} at byte {e.start:,} of the line "
                                     f"(byte {offset + e.start:,} of the file)"))
        offset += len(r) + 1
    return lines


def _take_id(job: Job, obj: dict) -> None:
    """The line's id, before anything else is checked: an error record keeps it whenever it is usable."""
    key = "custom_id" if "custom_id" in obj else "id"
    rid = obj.get(key)
    if isinstance(rid, str) or _is_int(rid):
        job.id, job.custom_id = rid, key == "custom_id"


def parse_line(text: str | Undecodable, index: int, line: int) -> Job:
    """One input line -> a Job (with `error` set when the line cannot run)."""
    job = Job(index=index, line=line, id=line)
    if isinstance(text, Undecodable):
        job.error = text.message
        return job
    if not text.strip():
        job.error = "empty line; expected a JSON object"
        return job
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        job.error = f"invalid JSON ({e.msg} at column {e.colno})"
        return job
    except ValueError:  # Python refuses integers of more than 4,300 digits
        job.error = "invalid JSON (a number too long to read: over 4,300 digits)"
        return job
    except RecursionError:
        job.error = "invalid JSON (nested too deeply)"
        return job
    try:
        if not isinstance(obj, dict):
            raise LineError(f"expected a JSON object, got {type(obj).__name__}")
        _take_id(job, obj)
        (_openai if "custom_id" in obj else _native)(job, obj)
    except (LineError, MessageError) as e:
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
    try:
        return (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # an id or a quoted value holds a lone surrogate: \\u escapes keep it valid JSON
        return (json.dumps(rec, ensure_ascii=True) + "\n").encode("ascii")


def write_all(f, data: bytes) -> None:
    """One line, whole: a single write (looping only if the OS takes part of it), then flush."""
    view = memoryview(data)
    while view:
        n = f.write(view)
        view = view[n if n is not None else len(view):]
    f.flush()


@dataclass
class Done:
    """What an existing OUT already holds, read for --resume without changing a byte of it."""

    records: list[tuple[str, bool]] = field(default_factory=list)  # (id_key, answered) per whole line
    end: int = 0  # bytes of whole result lines; anything after them is a partial line a killed run left
    size: int = 0

    @property
    def ids(self) -> set[str]:
        return {k for k, _ in self.records}

    def errors(self, among: set[str]) -> int:
        """Error records whose id is in `among`."""
        return sum(not ok and k in among for k, ok in self.records)


_HEAD = b'{"id": '  # how every line kvchat writes starts (see Job.record)


def _result_line(rec) -> bool | None:
    """True: an answer, False: an error record, None: not a line kvchat writes."""
    if not isinstance(rec, dict) or not (isinstance(rec.get("id"), str) or _is_int(rec.get("id"))):
        return None
    if isinstance(rec.get("error"), dict):
        return False
    if isinstance(rec.get("text"), str):
        return True
    return None


def read_done(path: str) -> Done:
    """Check that OUT is a kvchat results file (every whole line a result or error record, a partial last
    line the start of one) and return what it holds. Raises ValueError naming the first line that is not;
    writes nothing: the caller cuts the partial line only once it appends."""
    if not os.path.exists(path):
        return Done()

    def refuse(why: str) -> ValueError:  # not str.format: a path may hold braces
        return ValueError(f"{path} is not a kvchat results file, so --resume will not touch it: {why}; "
                          "give the OUT of an earlier run")

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    end = data.rfind(b"\n") + 1
    done = Done(end=end, size=len(data))
    for n, raw in enumerate(data[:end].split(b"\n")[:-1], 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise refuse(f"line {n} is not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start:,} of the line)") from None
        except (ValueError, RecursionError):
            raise refuse(f"line {n} is not JSON") from None
        ok = _result_line(rec)
        if ok is None:
            swapped = isinstance(rec, dict) and ({"prompt", "messages", "body"} & rec.keys())
            raise refuse(f"line {n} is not a result line" + (" but a request (are IN and OUT swapped?)" if swapped else ""))
        done.records.append((id_key(rec["id"]), ok))
    tail = data[end:]
    if tail and not (tail.startswith(_HEAD) or _HEAD.startswith(tail)):
        last = data[:end].count(b"\n") + 1
        raise refuse(f"its last line (line {last}, no newline) is not the start of a result line")
    return done


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
