"""The OpenAI response shape an entry may hold, checked when an entry is built.

An :class:`~cachesvc.store.envelope.Entry` runs :func:`answer_problem` on its answer whether it
is being written (a fill) or read back (a hit, the scan), so the read side refuses exactly what
the write side refuses: no choices, a stream whose choices never finish, a choice that is not
an object, an ``index`` that is not an integer, a ``message`` or ``delta`` that is not an
object. The replay and conversion code (:mod:`cachesvc.streaming`) can then trust every entry
it is handed.

Only what the service relies on is checked; every other field passes through as the upstream
sent it. Objects are ``dict`` (what JSON and msgpack decode to): the check runs once for every
stored entry read, so it avoids the slower abstract-type checks.
"""

from __future__ import annotations

from typing import Any

#: (field path, problem) of the first shape error found.
Problem = tuple[str, str]


def answer_problem(*, response: Any = None, stream: Any = None) -> Problem | None:
    """The first way the answer breaks the shape, or None. Give exactly one of the two."""
    if stream is not None:
        return _stream_problem(stream)
    return _body_problem(response)


def _body_problem(body: Any) -> Problem | None:
    if not isinstance(body, dict):
        return "response", "is not an object"
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        return "response.choices", "is missing or empty (a stored answer needs a choice)"
    seen: set[int] = set()
    for i, ch in enumerate(choices):
        where = f"response.choices[{i}]"
        problem = _choice_problem(ch, where, part=("message", "text"))
        if problem is not None:
            return problem
        idx = ch.get("index", 0)
        if idx in seen:
            return f"{where}.index", f"{idx} appears twice"
        seen.add(idx)
        if not isinstance(ch.get("finish_reason"), str):
            return f"{where}.finish_reason", "is missing (only a complete answer is stored)"
    return _usage_problem(body, "response")


def _stream_problem(chunks: Any) -> Problem | None:
    if not isinstance(chunks, list) or not chunks:
        return "chunks", "is not a non-empty array of chunk objects"
    finished: dict[int, bool] = {}
    for n, chunk in enumerate(chunks):
        where = f"chunks[{n}]"
        if not isinstance(chunk, dict):
            return where, "is not an object"
        choices = chunk.get("choices")
        if choices is None:
            choices = []
        if not isinstance(choices, list):
            return f"{where}.choices", "is not an array"
        for i, ch in enumerate(choices):
            problem = _choice_problem(ch, f"{where}.choices[{i}]", part=("delta", "text"))
            if problem is not None:
                return problem
            reason = ch.get("finish_reason")
            if reason is not None and not isinstance(reason, str):
                return f"{where}.choices[{i}].finish_reason", "is not a string or null"
            idx = ch.get("index", 0)
            finished[idx] = finished.get(idx, False) or reason is not None
        problem = _usage_problem(chunk, where)
        if problem is not None:
            return problem
    if not finished:
        return "chunks", "carry no choice (a stored stream needs one)"
    open_ = sorted(i for i, done in finished.items() if not done)
    if open_:
        return "chunks", f"choice {open_[0]} never got a finish_reason (the stream did not end)"
    return None


def _choice_problem(ch: Any, where: str, *, part: tuple[str, str]) -> Problem | None:
    if not isinstance(ch, dict):
        return where, "is not an object"
    idx = ch.get("index", 0)
    if type(idx) is not int or idx < 0:
        return f"{where}.index", f"{idx!r} is not a non-negative integer"
    obj_field, text_field = part
    if obj_field in ch:
        obj = ch[obj_field]
        if not isinstance(obj, dict) and not (obj is None and obj_field == "delta"):
            return f"{where}.{obj_field}", "is not an object"
        if isinstance(obj, dict):
            return _message_problem(obj, f"{where}.{obj_field}")
    elif text_field in ch:
        if not isinstance(ch[text_field], str):
            return f"{where}.{text_field}", "is not a string"
    else:
        return where, f"has neither {obj_field} nor {text_field}"
    return None


def _message_problem(msg: dict[str, Any], where: str) -> Problem | None:
    role = msg.get("role")
    if role is not None and not isinstance(role, str):
        return f"{where}.role", "is not a string"
    content = msg.get("content")
    if content is not None and not isinstance(content, (str, list)):
        return f"{where}.content", "is not a string, an array or null"
    calls = msg.get("tool_calls")
    if calls is None:
        return None
    if not isinstance(calls, list):
        return f"{where}.tool_calls", "is not an array"
    for i, tc in enumerate(calls):
        if not isinstance(tc, dict):
            return f"{where}.tool_calls[{i}]", "is not an object"
        if "index" in tc and type(tc["index"]) is not int:
            return f"{where}.tool_calls[{i}].index", "is not an integer"
        fn = tc.get("function")
        if fn is not None and not isinstance(fn, dict):
            return f"{where}.tool_calls[{i}].function", "is not an object"
    return None


def _usage_problem(obj: dict[str, Any], where: str) -> Problem | None:
    usage = obj.get("usage")
    if usage is not None and not isinstance(usage, dict):
        return f"{where}.usage", "is not an object"
    return None


def describe(problem: Problem) -> str:
    return f"{problem[0]}: {problem[1]}"


__all__ = ["Problem", "answer_problem", "describe"]
