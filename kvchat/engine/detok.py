"""Incremental detokenization and stop-string matching: O(1) amortized work per generated token.

Re-decoding the whole reply and re-scanning it for stop strings at every token costs O(n) a token,
O(n^2) a reply. Here each token decodes only a short window: the tokens since the last committed
text plus the few before them (byte-level BPE needs its neighbours to join multi-byte characters;
the same prefix/read-offset scheme as vLLM and HF's TextStreamer). The text of a token that ends in
an incomplete UTF-8 sequence is held as a tail, not committed, until the character completes.
"""

from __future__ import annotations

CONTEXT = 4  # tokens decoded before the new ones so the tokenizer sees the same neighbours


class Detokenizer:
    """`add(token)` -> the reply text so far (committed text + a provisional tail). `text` equals
    `tokenizer.decode(tokens, skip_special_tokens=True)` for byte-level tokenizers; `work` counts the
    tokens passed to `decode` (tests check it stays O(1) a token)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.committed = ""
        self.tail = ""  # decoded text not yet committed (ends in a half character)
        self.prefix = 0  # ids[prefix:read] decoded to the end of `committed`
        self.read = 0
        self.work = 0

    @property
    def text(self) -> str:
        return self.committed + self.tail

    def _decode(self, ids: list[int]) -> str:
        self.work += len(ids)
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        if not now.startswith(before):  # the window decodes differently in context: decode it all once
            return self._reset()
        new = now[len(before):]
        if new.endswith("\ufffd"):
            self.tail = new
        else:
            self.committed += new
            self.tail = ""
            self.prefix = max(self.read, len(self.ids) - CONTEXT)
            self.read = len(self.ids)
        return self.text

    def _reset(self) -> str:
        whole = self._decode(self.ids)
        self.committed, self.tail = (whole, "") if not whole.endswith("\ufffd") else ("", whole)
        if not self.tail:
            self.prefix, self.read = max(0, len(self.ids) - CONTEXT), len(self.ids)
        return self.text


class StopMatcher:
    """Finds the earliest stop string in a growing text, scanning only what could hold a new match."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.scanned = 0  # every match starting before this index has been ruled out

    def find(self, text: str, stable: int) -> int:
        """Index of the earliest stop string in `text`, or -1. `stable`: the length of the prefix of
        `text` that will not change (committed text)."""
        if not self.stops:
            return -1
        start = max(0, self.scanned)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        # A stop string starting at i lies inside the stable prefix iff i + len <= stable: once every
        # start below stable - longest + 1 is checked, it never needs checking again.
        self.scanned = max(self.scanned, stable - self.longest + 1)
        return min(hits) if hits else -1
