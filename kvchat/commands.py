"""REPL slash commands: pure functions of the session, so tests need no terminal.

`handle(session, line)` returns a `Reply`: text to print, whether to leave, and a prompt to answer next
(for /retry). Bad input gets one line saying what is accepted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kvchat.errors import KvchatError
from kvchat.profiles import load_profile, shipped_names
from kvchat.stats import human_bytes, layer_chart, saved_pct

SETTABLE = {"temperature": float, "top_p": float, "top_k": int, "max_new_tokens": int, "seed": int}

HELP = """\
Type a message and press Enter. Multiline: Esc then Enter inserts a newline, or open and close a block
with a line holding only \"\"\". Ctrl-C stops an answer; Ctrl-D or /exit leaves.
  /help                  this help
  /exit                  leave
  /reset                 new conversation (same profile)
  /profile NAME          switch profile (a shipped name or a .yaml path), new conversation
  /profiles              list shipped profiles
  /system TEXT           set the system prompt (empty: none), new conversation
  /set KEY VALUE         temperature | top_p | top_k | max_new_tokens | seed
  /stats                 tokens, speed and KV memory for the last turn and the conversation
  /save FILE             save the transcript as JSON
  /load FILE             load a transcript saved with /save (continues it)
  /undo                  drop the last exchange
  /retry                 answer the last message again"""


@dataclass
class Reply:
    text: str = ""
    exit: bool = False
    ask: str | None = None


def _set(session, arg: str) -> Reply:
    parts = arg.split()
    if len(parts) != 2 or parts[0] not in SETTABLE:
        return Reply(f"usage: /set KEY VALUE with KEY one of {', '.join(SETTABLE)}")
    key, raw = parts
    try:
        value = SETTABLE[key](raw)
    except ValueError:
        return Reply(f"/set {key}: {raw!r} is not a{'n integer' if SETTABLE[key] is int else ' number'}")
    limits = {"temperature": value >= 0, "top_p": 0 < value <= 1, "top_k": value >= 0, "max_new_tokens": value >= 1,
              "seed": True}
    if not limits[key]:
        accepted = {"temperature": ">= 0", "top_p": "in (0, 1]", "top_k": ">= 0 (0 is off)", "max_new_tokens": ">= 1"}
        return Reply(f"/set {key}: {raw} is out of range; accepted: {accepted[key]}")
    session.params = dataclasses.replace(session.params, **{key: value})
    return Reply(f"{key} = {value}")


def stats_text(session) -> str:
    if not session.turns:
        return "no turns yet"
    last = session.turns[-1].result
    st = session.engine.store
    tok = sum(t.result.completion_tokens for t in session.turns)
    dec = sum(t.result.timing["decode_s"] for t in session.turns)
    held, full = st.slot_held(0), st.slot_full(0)
    lines = [
        f"profile {session.profile.name}: {session.profile.describe()}",
        f"last turn     prompt {session.turns[-1].prefill_tokens} tok prefilled"
        f"{' (on top of the kept cache)' if session.turns[-1].reused else ''}, generated {last.completion_tokens} tok, "
        f"{last.timing['tokens_per_s']:.1f} tok/s, KV {human_bytes(last.kv['bytes_held'])} held vs "
        f"{human_bytes(last.kv['bytes_full'])} full ({saved_pct(last.kv['bytes_held'], last.kv['bytes_full'])} saved)",
        f"conversation  {len(session.turns)} turns, {st.seen[0]} tokens seen, generated {tok} tok, "
        f"{tok / dec if dec else 0:.1f} tok/s, KV {human_bytes(held)} held vs {human_bytes(full)} full "
        f"({saved_pct(held, full)} saved), peak {human_bytes(st.slot_peak_held[0])} held",
        "tokens kept per layer (per KV head where heads differ):",
    ]
    return "\n".join(lines + layer_chart(st.tokens_kept(0), st.seen[0], aliases=session.engine.aliases))


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


def load(session, path: str) -> Reply:
    try:
        data = json.loads(Path(path).expanduser().read_text())
    except OSError as e:
        return Reply(f"/load: cannot read {path}: {e.strerror}")
    except json.JSONDecodeError as e:
        return Reply(f"/load: {path} is not JSON ({e.msg} at line {e.lineno}); expected a file written by /save")
    msgs = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in msgs):
        return Reply(f"/load: {path} has no 'messages' list of {{role, content}}; expected a file written by /save")
    session.reset()
    session.system = data.get("system")
    session.messages = [{"role": m["role"], "content": m["content"]} for m in msgs]
    return Reply(f"loaded {len(msgs)} messages from {path}; the next message continues that conversation")


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
        if not arg:
            return Reply(f"usage: /profile NAME (one of {', '.join(shipped_names())}, or a .yaml path)")
        try:
            session.reset(load_profile(arg))
        except KvchatError as e:
            return Reply(str(e))
        return Reply(f"profile {session.profile.name}: {session.profile.describe()} (new conversation)")
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
    if cmd == "/retry":
        if len(session.messages) < 2:
            return Reply("nothing to retry")
        text = session.messages[-2]["content"]
        undo(session)
        return Reply(ask=text)
    return Reply(f"unknown command {cmd!r}; commands: /help /exit /reset /profile /profiles /system /set /stats "
                 "/save /load /undo /retry")
