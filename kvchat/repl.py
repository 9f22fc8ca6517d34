"""The interactive chat: prompt-toolkit input, streamed answers, slash commands, a stats line per answer.

Input history persists under KVCHAT_HOME. Esc+Enter inserts a newline; a line holding only \"\"\" opens
and closes a multiline block. Ctrl-C stops an answer (the REPL stays), Ctrl-D or /exit leaves.
"""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager

from kvchat.commands import handle
from kvchat.engine import PrefillInterrupted
from kvchat.errors import KvchatError
from kvchat.model import kvchat_home
from kvchat.stats import prefill_progress, turn_line

FENCE = '"""'


def _bindings():
    from prompt_toolkit.key_binding import KeyBindings

    kb = KeyBindings()

    @kb.add("escape", "enter")
    def _(event):
        event.current_buffer.insert_text("\n")

    return kb


@contextmanager
def interruptible():
    """Ctrl-C during an answer sets a flag the loop polls between decode steps (the store stays whole)."""
    flag = {"stop": False}
    try:
        old = signal.signal(signal.SIGINT, lambda *_: flag.__setitem__("stop", True))
    except ValueError:  # not the main thread (tests): no handler, nothing to restore
        old = None
    try:
        yield lambda: flag["stop"]
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


class Repl:
    def __init__(self, session, quiet=False, input=None, output=None, write=None):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory

        self.session, self.quiet = session, quiet
        self.write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        hist_path = kvchat_home() / "history"
        try:
            hist_path.parent.mkdir(parents=True, exist_ok=True)
            history = FileHistory(str(hist_path))
        except OSError:
            history = InMemoryHistory()
        self.prompt = PromptSession(history=history, key_bindings=_bindings(), input=input, output=output)

    def label(self) -> str:
        return f"{self.session.lm.desc.name} [{self.session.profile.name}]> "

    def read(self) -> str | None:
        """One message (or command); None at end of input."""
        try:
            text = self.prompt.prompt(self.label())
        except KeyboardInterrupt:
            return ""
        except EOFError:
            return None
        if text.strip() != FENCE:
            return text
        lines = []
        while True:
            try:
                line = self.prompt.prompt("... ")
            except (EOFError, KeyboardInterrupt):
                break
            if line.strip() == FENCE:
                break
            lines.append(line)
        return "\n".join(lines)

    def answer(self, text: str) -> None:
        with interruptible() as stopped:
            try:
                turn = self.session.ask(text, on_token=lambda _id, delta: self.write(delta), should_stop=stopped,
                                        on_progress=prefill_progress(self.write))
            except KvchatError as e:
                self.write(f"error: {e}\n")
                return
            except PrefillInterrupted:
                self.write("[stopped while reading the message: not answered, the conversation is as before]\n")
                return
        self.write("\n")
        if turn.notice:
            self.write(f"{turn.notice}\n")
        if turn.result.finish_reason == "interrupted":
            self.write("[stopped]\n")
        if not self.quiet:
            self.write(f"  {turn_line(turn.result)}\n")

    def run(self) -> None:
        s = self.session
        self.write(f"kvchat · {s.lm.desc.name} · profile {s.profile.name} ({s.profile.describe()}) · /help for commands\n")
        while True:
            text = self.read()
            if text is None:
                break
            if not text.strip():
                continue
            if text.lstrip().startswith("/"):
                reply = handle(s, text)
                if reply.text:
                    self.write(reply.text + "\n")
                if reply.exit:
                    break
                if reply.ask is not None:
                    self.answer(reply.ask)
                continue
            self.answer(text)


def run_repl(session, opts=None, quiet=False, input=None, output=None, write=None) -> None:
    Repl(session, quiet=quiet, input=input, output=output, write=write).run()
