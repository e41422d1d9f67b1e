"""What an answer says, independent of how it was delivered (one JSON body or SSE chunks).

The auditor compares answers (a hit against a recompute, a hit against the entry it came from)
and searches them for canaries; both need the text, the tool calls and the finish reasons of
every choice, whether the body was a chat completion, a text completion, or a recorded stream.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True, slots=True)
class Choice:
    """One choice: its text (content, or ``text`` for completions), reasoning, tool calls."""

    index: int
    text: str
    reasoning: str = ""
    tool_calls: str = ""  # canonical JSON of the tool calls, "" when none
    finish_reason: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Answer:
    """Every choice of a response, ordered by index."""

    choices: tuple[Choice, ...]

    @property
    def text(self) -> str:
        """All the text a reader of the answer sees (content, reasoning, tool-call arguments)."""
        return "\n".join(
            part for c in self.choices for part in (c.text, c.reasoning, c.tool_calls) if part
        )

    @property
    def first_text(self) -> str:
        return self.choices[0].text if self.choices else ""

    def same_as(self, other: Answer) -> bool:
        """Equal content, reasoning, tool calls and finish reasons, choice by choice."""
        return self.choices == other.choices

    @classmethod
    def of(cls, served: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None) -> Answer:
        """Parse a response body (a mapping) or a list of stream chunks."""
        if served is None:
            return cls(choices=())
        if isinstance(served, Mapping):
            return _from_response(served)
        return _from_chunks(served)


def _canon(value: Any) -> str:
    if not value:
        return ""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(
            str(p.get("text", "")) if isinstance(p, Mapping) else str(p) for p in content
        )
    return str(content)


def _from_response(body: Mapping[str, Any]) -> Answer:
    out = []
    for i, choice in enumerate(body.get("choices") or ()):
        if not isinstance(choice, Mapping):
            continue
        index = int(choice.get("index", i))
        message = choice.get("message")
        if isinstance(message, Mapping):
            text = _text_of(message.get("content"))
            reasoning = _text_of(message.get("reasoning_content") or message.get("reasoning"))
            tools = message.get("tool_calls") or (
                [message["function_call"]] if message.get("function_call") else None
            )
        else:
            text = _text_of(choice.get("text"))
            reasoning, tools = "", None
        out.append(
            Choice(index=index, text=text, reasoning=reasoning, tool_calls=_canon(tools),
                   finish_reason=choice.get("finish_reason"))
        )
    out.sort(key=lambda c: c.index)
    return Answer(choices=tuple(out))


def _from_chunks(chunks: Sequence[Mapping[str, Any]]) -> Answer:
    texts: dict[int, list[str]] = {}
    reasoning: dict[int, list[str]] = {}
    finish: dict[int, str | None] = {}
    tools: dict[int, dict[int, dict[str, Any]]] = {}
    for chunk in chunks:
        if not isinstance(chunk, Mapping):
            continue
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, Mapping):
                continue
            index = int(choice.get("index", 0))
            texts.setdefault(index, [])
            delta = choice.get("delta")
            if isinstance(delta, Mapping):
                texts[index].append(_text_of(delta.get("content")))
                r = delta.get("reasoning_content") or delta.get("reasoning")
                if r:
                    reasoning.setdefault(index, []).append(_text_of(r))
                for call in delta.get("tool_calls") or ():
                    _merge_tool_delta(tools.setdefault(index, {}), call)
            elif "text" in choice:
                texts[index].append(_text_of(choice.get("text")))
            if choice.get("finish_reason") is not None:
                finish[index] = choice["finish_reason"]
    out = []
    for index in sorted(texts):
        calls = [tools[index][k] for k in sorted(tools.get(index, {}))]
        out.append(
            Choice(index=index, text="".join(texts[index]),
                   reasoning="".join(reasoning.get(index, [])), tool_calls=_canon(calls),
                   finish_reason=finish.get(index))
        )
    return Answer(choices=tuple(out))


def _merge_tool_delta(acc: dict[int, dict[str, Any]], call: Any) -> None:
    # Streamed tool calls arrive as fragments keyed by index; arguments are concatenated.
    if not isinstance(call, Mapping):
        return
    slot = acc.setdefault(int(call.get("index", len(acc))), {"function": {"arguments": ""}})
    for field in ("id", "type"):
        if call.get(field):
            slot[field] = call[field]
    fn = call.get("function")
    if isinstance(fn, Mapping):
        if fn.get("name"):
            slot["function"]["name"] = fn["name"]
        if fn.get("arguments"):
            slot["function"]["arguments"] += str(fn["arguments"])
