"""Turning generated token ids into text as they come: incremental detokenization and stop
sequences (held back until they can no longer begin a stop)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class Detokenizer:
    """Decodes a growing list of token ids, each token costing a decode of a few tokens, not of
    the whole list.

    The text of ``ids[prefix:read]`` is known; a new token's text is what decoding
    ``ids[prefix:]`` adds to it. A decode that ends in the replacement character (a multi-byte
    character split across tokens) waits for the next token.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self.text = ""

    def _decode(self, ids: Sequence[int]) -> str:
        text: str = self._tokenizer.decode(list(ids), skip_special_tokens=True)
        return text

    def add(self, token_id: int) -> str:
        """Append a token; returns the text it completes (possibly empty)."""
        self._ids.append(token_id)
        known = self._decode(self._ids[self._prefix : self._read])
        new = self._decode(self._ids[self._prefix :])
        if len(new) <= len(known) or new.endswith("\ufffd"):
            return ""
        delta = new[len(known) :]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """The text still held back at the end (an incomplete character decodes as U+FFFD)."""
        known = self._decode(self._ids[self._prefix : self._read])
        new = self._decode(self._ids[self._prefix :])
        delta = new[len(known) :] if len(new) > len(known) else ""
        self._prefix = self._read = len(self._ids)
        self.text += delta
        return delta


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Where the first stop sequence begins in ``text`` (searching from ``start``), if any."""
    cuts = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(cuts) if cuts else None


def safe_len(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` can be shown: hold back a tail that may begin a stop sequence, and
    a trailing replacement character (a multi-byte character split across tokens)."""
    n = len(text)
    while n > 0 and text[n - 1] == "\ufffd":
        n -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, n), 0, -1):
            if text[n - k : n] == s[:k]:
                hold = max(hold, k)
                break
    return n - hold
