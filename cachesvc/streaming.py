"""Streams: SSE framing, and faithful conversion between a response body and its chunks.

A stored entry holds what the upstream produced: either one JSON body or the ordered list of
stream chunks. ``stream`` is not keyed, so a streaming request may hit an entry filled by a
non-streaming one and the reverse; these functions convert without losing any field the API
defines (content, reasoning content, refusals, tool calls with their ids and argument pieces,
logprobs, finish reasons, usage, and unknown delta fields, which are concatenated when they
are strings and otherwise kept as last sent).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"

_COMMON = ("id", "created", "model", "system_fingerprint", "service_tier")


def sse(chunk: Mapping[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def is_usage_chunk(chunk: Mapping[str, Any]) -> bool:
    return not chunk.get("choices") and chunk.get("usage") is not None


def body_complete(body: Any) -> bool:
    """Whether a JSON response is complete: choices, each with a finish_reason."""
    choices = body.get("choices") if isinstance(body, Mapping) else None
    return bool(choices) and isinstance(choices, list) and all(
        isinstance(c, Mapping) and c.get("finish_reason") is not None for c in choices)


def stream_complete(chunks: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a recorded stream ended normally: every choice seen has a finish_reason."""
    seen: dict[int, bool] = {}
    for c in chunks:
        for ch in c.get("choices") or ():
            idx = ch.get("index", 0)
            seen.setdefault(idx, False)
            if ch.get("finish_reason") is not None:
                seen[idx] = True
    return bool(seen) and all(seen.values())


def replay(chunks: Sequence[Mapping[str, Any]], *, include_usage: bool) -> list[Mapping[str, Any]]:
    """The chunks to send for a stored stream; the usage-only chunk only when asked for."""
    if include_usage:
        return list(chunks)
    return [c for c in chunks if not is_usage_chunk(c)]


def chunks_to_body(chunks: Sequence[Mapping[str, Any]], kind: str) -> dict[str, Any]:
    """Assemble the non-streamed body that the stream ``chunks`` deliver piece by piece."""
    body: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in chunks:
        for k in _COMMON:
            if chunk.get(k) is not None:
                body[k] = chunk[k]
        if chunk.get("usage") is not None:
            usage = chunk["usage"]
        for ch in chunk.get("choices") or ():
            idx = ch.get("index", 0)
            acc = choices.setdefault(idx, {"index": idx, "_delta": {}, "logprobs": None,
                                           "finish_reason": None, "_text": ""})
            if kind == "chat":
                _merge_delta(acc["_delta"], ch.get("delta") or {})
            else:
                acc["_text"] += ch.get("text") or ""
            if ch.get("logprobs") is not None:
                acc["logprobs"] = _merge_logprobs(acc["logprobs"], ch["logprobs"])
            if ch.get("finish_reason") is not None:
                acc["finish_reason"] = ch["finish_reason"]
            for k, v in ch.items():
                if k not in ("index", "delta", "text", "logprobs", "finish_reason"):
                    acc[k] = v
    out_choices = []
    for idx in sorted(choices):
        acc = choices[idx]
        delta = acc.pop("_delta")
        text = acc.pop("_text")
        if kind == "chat":
            message = {"role": delta.pop("role", "assistant"),
                       "content": delta.pop("content", None)}
            if "tool_calls" in delta:
                message["tool_calls"] = [
                    {k: v for k, v in tc.items() if k != "index"}
                    for _, tc in sorted(delta.pop("tool_calls").items())
                ]
            message.update(delta)
            out_choices.append({"index": idx, "message": message, **_rest(acc)})
        else:
            out_choices.append({"index": idx, "text": text, **_rest(acc)})
    body["object"] = "chat.completion" if kind == "chat" else "text_completion"
    body["choices"] = out_choices
    if usage is not None:
        body["usage"] = usage
    return body


def body_to_chunks(body: Mapping[str, Any], kind: str, *, include_usage: bool
                   ) -> list[dict[str, Any]]:
    """The stream that delivers ``body``: per choice one chunk with everything, one with the
    finish reason, then the usage chunk if asked for."""
    head = {k: body[k] for k in _COMMON if body.get(k) is not None}
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    chunks: list[dict[str, Any]] = []
    for ch in body.get("choices") or ():
        idx = ch.get("index", 0)
        extra = {k: v for k, v in ch.items()
                 if k not in ("index", "message", "text", "logprobs", "finish_reason")}
        if kind == "chat":
            msg = dict(ch.get("message") or {})
            delta: dict[str, Any] = {"role": msg.pop("role", "assistant")}
            for k, v in msg.items():
                if k == "tool_calls" and v:
                    delta[k] = [{"index": i, **tc} for i, tc in enumerate(v)]
                elif v is not None:
                    delta[k] = v
            first = {"index": idx, "delta": delta, "logprobs": ch.get("logprobs"),
                     "finish_reason": None, **extra}
            last = {"index": idx, "delta": {}, "logprobs": None,
                    "finish_reason": ch.get("finish_reason")}
        else:
            first = {"index": idx, "text": ch.get("text", ""), "logprobs": ch.get("logprobs"),
                     "finish_reason": None, **extra}
            last = {"index": idx, "text": "", "logprobs": None,
                    "finish_reason": ch.get("finish_reason")}
        chunks.append({**head, "object": obj, "choices": [first]})
        chunks.append({**head, "object": obj, "choices": [last]})
    if include_usage and body.get("usage") is not None:
        chunks.append({**head, "object": obj, "choices": [], "usage": body["usage"]})
    return chunks


def _rest(acc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in acc.items() if k != "index"}


def _merge_delta(acc: dict[str, Any], delta: Mapping[str, Any]) -> None:
    for k, v in delta.items():
        if v is None:
            acc.setdefault(k, None)
        elif k == "tool_calls":
            calls = acc.setdefault("tool_calls", {})
            for tc in v:
                slot = calls.setdefault(tc.get("index", len(calls)), {})
                for tk, tv in tc.items():
                    if tk == "index":
                        continue
                    if tk == "function" and isinstance(tv, Mapping):
                        fn = slot.setdefault("function", {})
                        for fk, fv in tv.items():
                            if isinstance(fv, str) and isinstance(fn.get(fk), str):
                                fn[fk] += fv
                            elif fv is not None:
                                fn[fk] = fv
                    elif tv is not None:
                        slot[tk] = tv
        elif k == "role":
            acc["role"] = v
        elif isinstance(v, str) and isinstance(acc.get(k), str):
            acc[k] += v
        else:
            acc[k] = v


def _merge_logprobs(acc: Any, lp: Any) -> Any:
    if acc is None:
        return lp
    if isinstance(acc, dict) and isinstance(lp, dict):
        out = dict(acc)
        for k, v in lp.items():
            if isinstance(v, list) and isinstance(out.get(k), list):
                out[k] = out[k] + v
            elif v is not None:
                out[k] = v
        return out
    return lp

