"""Chat templating: a conversation -> prompt ids. The one place that renders and tokenizes messages.

Only the template's own framing becomes control tokens. Message text (system, user, assistant) is
tokenized with special-token strings as plain text, so `<|im_end|>` typed in a prompt, or read from a
shared batch file, cannot close a turn and open another. A tokenizer without a chat template (a base
model) gets the conversation as plain text (`plain_text`).
`--truncate left` cuts the oldest message text, never the framing.

Imports nothing from kvchat but its errors: session, batch, tests and benchmarks all use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from kvchat.errors import MessageError, PromptTooLong, TemplateError

ROLES = ("system", "user", "assistant")
PLAIN_SEP = "\n\n"  # between messages when the model has no chat template
# Stands in for message i while the framing is located: private-use characters no template strips.
_MARK = "\ue000{}\ue001"


@dataclass(frozen=True)
class Rendered:
    """A conversation rendered to text. `spans` are the character spans of message text that holds a
    special-token string (to be tokenized as plain text); `plain` is True without a chat template."""

    text: str
    spans: tuple[tuple[int, int], ...] = ()
    plain: bool = False


# ---- messages ------------------------------------------------------------------------------------------
def check_text(name: str, v) -> str:
    """A string the tokenizer can take: JSON's \\ud800 escapes give lone surrogates, which UTF-8 cannot hold."""
    if not isinstance(v, str):
        raise MessageError(f"{name} must be a string, got {type(v).__name__}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MessageError(f"{name} is not valid Unicode: a lone surrogate \\u{ord(v[e.start]):04x} at character {e.start}") from None
    return v


def _content(c, i: int) -> str:
    if isinstance(c, str):
        return check_text(f"messages[{i}].content", c)
    # OpenAI content parts: keep the text ones, refuse images and audio rather than drop them silently.
    if isinstance(c, list) and all(isinstance(p, dict) for p in c):
        kinds = {p.get("type") for p in c}
        if kinds <= {"text"} and all(isinstance(p.get("text"), str) for p in c):
            return check_text(f"messages[{i}].content", "".join(p["text"] for p in c))
        raise MessageError(f"messages[{i}].content has parts of type {sorted(map(str, kinds - {'text'}))}; only text is supported")
    raise MessageError(f"messages[{i}].content must be a string, got {type(c).__name__}")


def check_messages(msgs) -> list[dict]:
    """Batch `messages` and /load transcripts: a non-empty list of {role, content} with known roles and
    text content. -> the messages with only those two keys."""
    if not isinstance(msgs, list):
        raise MessageError(f"'messages' must be a list, got {type(msgs).__name__}")
    if not msgs:
        raise MessageError("'messages' is empty; give at least one message")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise MessageError(f"messages[{i}] must be an object with 'role' and 'content', got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise MessageError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {json.dumps(m.get('role'))[:60]}")
        out.append({"role": m["role"], "content": _content(m.get("content"), i)})
    return out


# ---- rendering -----------------------------------------------------------------------------------------
def has_template(tok) -> bool:
    return getattr(tok, "chat_template", None) is not None


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    """`system` goes first unless the messages already open with a system message (which wins)."""
    if system and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}] + list(messages)
    return list(messages)


def plain_text(msgs: list[dict]) -> str:
    """A conversation for a model without a chat template: system and user text start after a blank line,
    an answer continues the text before it (it is what the model wrote there), so a chat's next turn
    still extends what the store holds."""
    text = ""
    for m in msgs:
        if text and m["role"] != "assistant":
            text += PLAIN_SEP
        text += m["content"]
    return text


def special_strings(tok) -> set[str]:
    """Texts the tokenizer would turn into special (control) tokens when found in raw text."""
    found = {t for t in getattr(tok, "all_special_tokens", ()) if t}
    for added in getattr(tok, "added_tokens_decoder", {}).values():
        if getattr(added, "special", False) and added.content:
            found.add(added.content)
    return found


def render(tok, messages: list[dict], system: str | None = None) -> Rendered:
    """Messages (+ system) -> the prompt text with the generation prompt, and where risky text sits."""
    msgs = with_system(messages, system)
    contents = [m["content"] for m in msgs]
    specials = special_strings(tok)
    if not has_template(tok):
        text = plain_text(msgs)
        risky = any(s in text for s in specials)
        return Rendered(text, ((0, len(text)),) if risky else (), plain=True)
    text = _apply(tok, msgs)
    risky = [i for i, c in enumerate(contents) if any(s in c for s in specials)]
    if not risky:
        return Rendered(text)
    spans = _locate(tok, msgs, text)
    if spans is None:
        found = sorted(s for s in specials if any(s in contents[i] for i in risky))[:3]
        raise TemplateError(f"this model's chat template rewrites message text, so kvchat cannot keep the special-token "
                            f"strings in it ({', '.join(found)}) as plain text; remove them from the message")
    return Rendered(text, tuple(spans[i] for i in risky))


def _apply(tok, msgs: list[dict]) -> str:
    try:
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja2 raises on conversations a template refuses (roles out of turn, ...)
        raise TemplateError(f"the chat template refused these messages: {str(e).splitlines()[0][:200]}") from None


def _locate(tok, msgs: list[dict], text: str) -> list[tuple[int, int]] | None:
    """Each message's text span in `text`, found from the framing the template renders around stand-ins
    (a template may trim the text); None when it rewrites the text or branches on it."""
    marked = _apply(tok, [{**m, "content": _MARK.format(i)} for i, m in enumerate(msgs)])
    framing, rest = [], marked
    for i in range(len(msgs)):
        head, sep, rest = rest.partition(_MARK.format(i))
        if not sep:
            return None
        framing.append(head)
    framing.append(rest)
    if not text.startswith(framing[0]):
        return None
    spans, at = [], len(framing[0])
    for m, nxt in zip(msgs, framing[1:]):
        c = m["content"]
        for cand in (c, c.strip(), c.lstrip(), c.rstrip()):  # templates that trim text
            if text.startswith(cand, at) and text.startswith(nxt, at + len(cand)):
                break
        else:
            return None
        spans.append((at, at + len(cand)))
        at += len(cand) + len(nxt)
    return spans if at == len(text) else None


def encode(tok, r: Rendered, start: int = 0) -> list[int]:
    """Ids of `r.text[start:]`: framing with its control tokens, risky message text as plain text.
    A plain (untemplated) prompt gets the tokenizer's own BOS when it starts at 0."""
    pieces, at = [], start
    for a, b in r.spans:
        a, b = max(a, start), max(b, start)
        if a > at:
            pieces.append((r.text[at:a], False))
        if b > a:
            pieces.append((r.text[a:b], True))
        at = max(at, b)
    if at < len(r.text):
        pieces.append((r.text[at:], False))
    ids: list[int] = []
    for n, (piece, plain) in enumerate(pieces):
        bos = r.plain and start == 0 and n == 0
        kw = {"split_special_tokens": True} if plain else {}
        ids += tok(piece, add_special_tokens=bos, **kw)["input_ids"]
    return ids


def left_budget(context: int, max_new_tokens: int) -> int:
    """Prompt tokens `--truncate left` keeps: the context less room for the answer (at most half of it)."""
    return context - min(max_new_tokens, context // 2)


def prompt_ids(tok, messages: list[dict], system: str | None = None, budget: int | None = None) -> list[int]:
    """Messages (+ system) -> prompt ids with the generation prompt. With `budget`, a longer prompt loses its
    oldest messages, then the start of the oldest remaining message's text, until it fits: the framing
    (turn headers, generation prompt) and the system prompt always survive."""
    ids = encode(tok, render(tok, messages, system))
    if budget is None or len(ids) <= budget:
        return ids
    msgs = list(messages)
    first = 1 if msgs and msgs[0]["role"] == "system" else 0
    while len(msgs) - first > 1:
        msgs.pop(first)
        while len(msgs) - first > 1 and msgs[first]["role"] != "user":  # a conversation opens with a user turn
            msgs.pop(first)
        ids = encode(tok, render(tok, msgs, system))
        if len(ids) <= budget:
            return ids
    return _cut_left(tok, msgs, system, budget, len(ids) - budget)


def _cut_left(tok, msgs: list[dict], system, budget: int, over: int) -> list[int]:
    """Drop tokens from the start of the last message's text until the prompt fits in `budget`."""
    text = msgs[-1]["content"]
    cids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    cut = over
    while cut < len(cids):
        kept = tok.decode(cids[cut:], skip_special_tokens=False).lstrip("\ufffd")  # no half character
        ids = encode(tok, render(tok, msgs[:-1] + [{**msgs[-1], "content": kept}], system))
        if len(ids) <= budget:
            return ids
        cut += len(ids) - budget  # decoding and re-tokenizing can shift the count by a token or two
    framing = len(encode(tok, render(tok, msgs[:-1] + [{**msgs[-1], "content": ""}], system)))
    raise PromptTooLong(f"the prompt's framing and system prompt alone are {framing:,} tokens; "
                        f"--truncate left can keep at most {budget:,} (shorten the system prompt)")
