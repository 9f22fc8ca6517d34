"""REPL slash commands: pure functions of the session, so tests need no terminal.

`handle(session, line)` returns a `Reply`: text to print, whether to leave, and a prompt to answer next
(for /retry). Bad input gets one line saying what is accepted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kvchat import templating
from kvchat.engine import SamplingParams
from kvchat.errors import KvchatError, MessageError
from kvchat.profiles import load_profile, shipped_names
from kvchat.stats import human_bytes, kv_line, layer_chart

SETTABLE = {"temperature": float, "top_p": float, "top_k": int, "max_new_tokens": int, "seed": int}

HELP = """\
Type a message and press Enter. Multiline: Esc then Enter inserts a newline, or open and close a block
with a line holding only \"\"\". Ctrl-C stops an answer; Ctrl-D or /exit leaves.
  /help                  this help
  /exit                  leave
  /reset                 new conversation (same profile)
  /profile NAME          switch profile (a shipped name or a .yaml path); the conversation goes on
  /profiles              list shipped profiles
  /system TEXT           set the system prompt (empty: none), new conversation
  /set KEY VALUE         temperature | top_p | top_k | max_new_tokens | seed
  /stats                 tokens, speed and KV memory for the last turn and the conversation
  /save FILE             save the transcript as JSON
  /load FILE             load a transcript saved with /save (continues it)
  /undo                  drop the last exchange
  /retry                 answer the last message again
  /compare               score the last answer with the full cache: KL, top-1 agreement, first divergence"""


@dataclass
class Reply:
    text: str = ""
    exit: bool = False
    ask: str | None = None


def _seed_ok(seed: int) -> bool:
    try:
        dataclasses.replace(SamplingParams(), seed=seed).generator()
    except (OverflowError, RuntimeError, ValueError):
        return False
    return True


def _set(session, arg: str) -> Reply:
    parts = arg.split()
    if len(parts) != 2 or parts[0] not in SETTABLE:
        return Reply(f"usage: /set KEY VALUE with KEY one of {', '.join(SETTABLE)}")
    key, raw = parts
    try:
        value = SETTABLE[key](raw)
    except ValueError:
        return Reply(f"/set {key}: {raw!r} is not a{'n integer' if SETTABLE[key] is int else ' number'}")
    limits = {"temperature": 0 <= value < math.inf, "top_p": 0 < value <= 1, "top_k": value >= 0,
              "max_new_tokens": value >= 1, "seed": _seed_ok(value)}
    if not limits[key]:
        accepted = {"temperature": ">= 0, finite", "top_p": "in (0, 1]", "top_k": ">= 0 (0 is off)",
                    "max_new_tokens": ">= 1", "seed": "in [-2**63, 2**64)"}
        return Reply(f"/set {key}: {raw} is out of range; accepted: {accepted[key]}")
    session.params = dataclasses.replace(session.params, **{key: value})
    return Reply(f"{key} = {value}")


def stats_text(session) -> str:
    if not session.turns:
        return "no turns yet"
    last = session.turns[-1]
    eng = session.engine
    now = eng.usage(0)
    tok = sum(t.result.completion_tokens for t in session.turns)
    dec = sum(t.result.timing["decode_s"] for t in session.turns)
    kv = last.result.kv
    lines = [
        f"profile {session.profile.name}: {session.profile.describe()}",
        f"last turn     prompt {last.prefill_tokens} tok prefilled{' (on top of the kept cache)' if last.reused else ''}, "
        f"generated {last.result.completion_tokens} tok, {last.result.timing['decode_tokens_per_s']:.1f} tok/s decode, "
        + kv_line(kv["bytes_held"], kv["bytes_full"], kv["saved"], kv["overhead"]),
        f"conversation  {len(session.turns)} turns, {now.seen} tokens seen, generated {tok} tok, "
        f"{tok / dec if dec else 0:.1f} tok/s decode, {kv_line(now.held, now.full, now.saved, now.overhead)}, "
        f"peak {human_bytes(now.peak_held)} held",
        "tokens kept per layer (per KV head where heads differ):",
    ]
    return "\n".join(lines + layer_chart(eng.kept(0), now.seen))


def save(session, path: str) -> Reply:
    data = {"model": session.lm.desc.name, "profile": session.profile.name, "system": session.system,
            "messages": session.messages}
    p = Path(path).expanduser()
    try:
        fd, tmp = tempfile.mkstemp(dir=p.parent if str(p.parent) else ".", prefix=f".{p.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
        os.replace(tmp, p)
    except OSError as e:
        return Reply(f"/save: cannot write {path}: {e.strerror}")
    return Reply(f"saved {len(session.messages)} messages to {path}")


def _transcript(session, data) -> tuple[str | None, list[dict]]:
    """A loaded transcript's (system, messages), checked with batch's rules for `messages` and rendered
    once, so a transcript the chat template refuses fails here, not at the next message."""
    if not isinstance(data, dict):
        raise MessageError(f"expected an object with 'messages', got {type(data).__name__}")
    system = data.get("system")
    if system is not None:
        templating.check_text("'system'", system)
    msgs = data.get("messages")
    msgs = [] if msgs == [] else templating.check_messages(msgs)
    if system and msgs and msgs[0]["role"] == "system":
        raise MessageError("give the system prompt as 'system' or as a first system message, not both")
    if msgs:
        templating.render(session.lm.tokenizer, msgs, system)
    return system or None, msgs


def load(session, path: str) -> Reply:
    try:
        data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except OSError as e:
        return Reply(f"/load: cannot read {path}: {e.strerror}")
    except UnicodeDecodeError as e:
        return Reply(f"/load: {path} is not UTF-8 (byte {e.start:,}); expected a file written by /save")
    except json.JSONDecodeError as e:
        return Reply(f"/load: {path} is not JSON ({e.msg} at line {e.lineno}); expected a file written by /save")
    except (ValueError, RecursionError):
        return Reply(f"/load: {path} is not JSON kvchat can read; expected a file written by /save")
    try:
        system, msgs = _transcript(session, data)
    except KvchatError as e:
        return Reply(f"/load: {path}: {e}; nothing loaded (expected a file written by /save)")
    session.reset()
    session.system = system
    session.messages = msgs
    return Reply(f"loaded {len(msgs)} messages from {path}; the next message continues that conversation")


def profile(session, arg: str) -> Reply:
    """Switch profile and keep the conversation; the same profile again changes nothing."""
    if not arg:
        return Reply(f"usage: /profile NAME (one of {', '.join(shipped_names())}, or a .yaml path)")
    try:
        new = load_profile(arg)
        old = session.profile
        if (new.name, new.describe()) == (old.name, old.describe()):
            return Reply(f"already on profile {old.name}; nothing changed (/reset starts a new conversation)")
        session.switch(new)
    except KvchatError as e:
        return Reply(str(e))
    n = len(session.messages)
    kept = (f"; the conversation ({n} messages) goes on: it is prefilled again under {new.name} with your next message"
            if n else "")
    return Reply(f"profile {new.name}: {new.describe()}{kept}")


def compare(session) -> Reply:
    """The last answer teacher-forced through the full cache (kvchat/quality/compare.py)."""
    from kvchat.quality.compare import compare_answer, describe

    if not session.turns:
        return Reply("nothing to compare yet: ask something first")
    turn = session.turns[-1]
    rec = turn.result.logprobs
    if rec is None:
        return Reply("/compare: the last answer was not recorded (answers are recorded while /compare is available: "
                     "in the REPL)")
    try:
        q = compare_answer(session.engine.reference(), turn.context_ids, rec)
    except KvchatError as e:
        return Reply(f"/compare: {e}")
    return Reply(describe(q, session.lm.tokenizer, rec))


def undo(session) -> Reply:
    if len(session.messages) < 2:
        return Reply("nothing to undo")
    session.messages = session.messages[:-2]
    if session.turns:
        session.turns.pop()
    return Reply("dropped the last exchange")


def handle(session, line: str) -> Reply:
    cmd, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    if cmd in ("/exit", "/quit"):
        return Reply(exit=True)
    if cmd == "/help":
        return Reply(HELP)
    if cmd == "/reset":
        session.reset()
        return Reply("new conversation")
    if cmd == "/profiles":
        return Reply("shipped profiles: " + ", ".join(shipped_names()))
    if cmd == "/profile":
        return profile(session, arg)
    if cmd == "/system":
        session.system = arg or None
        session.reset()
        return Reply(f"system prompt {'set' if arg else 'cleared'} (new conversation)")
    if cmd == "/set":
        return _set(session, arg)
    if cmd == "/stats":
        return Reply(stats_text(session))
    if cmd in ("/save", "/load"):
        if not arg:
            return Reply(f"usage: {cmd} FILE")
        return save(session, arg) if cmd == "/save" else load(session, arg)
    if cmd == "/undo":
        return undo(session)
    if cmd == "/compare":
        return compare(session)
    if cmd == "/retry":
        if len(session.messages) < 2:
            return Reply("nothing to retry")
        text = session.messages[-2]["content"]
        undo(session)
        return Reply(ask=text)
    return Reply(f"unknown command {cmd!r}; commands: /help /exit /reset /profile /profiles /system /set /stats "
                 "/save /load /undo /retry /compare")
