"""The normaliser of each keyed request field: validate a value and fold it to canonical form.

Built from the field table (:mod:`keying.fields`): each keyed field's type names its
normaliser, and its default is normalised once here (:data:`CHAT_FIELDS`,
:data:`COMPLETION_FIELDS` and their canonical defaults). Equivalent spellings fold (a string
content and a one-text-part list; ``stop`` as a string, a list, or the same set in another
order; an omitted ``strict`` and ``false``); different meanings never do.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from msgpack import ExtType

from keying.canonical_json import (
    JSON_EXT,
    _as_json,
    _key_order,
    _tname,
    canon_json,
    canon_number,
    canon_value,
)
from keying.errors import InvalidRequestError
from keying.fields import INT64_MIN, UINT64_MAX, Keyed, keyed_specs

Normaliser = Callable[[Any, str], Any]


def _number_in(lo: float, hi: float) -> Normaliser:
    def norm(v: Any, path: str) -> int | float:
        n = canon_number(v, path)
        if not lo <= n <= hi:
            raise InvalidRequestError(path, f"{n} is out of range", f"use a value in [{lo}, {hi}]")
        return n

    return norm


#: A logit_bias value: a number in [-100, 100] (one normaliser for every token id).
_BIAS = _number_in(-100, 100)


def _int_in(lo: int, hi: int | None, *, nullable: bool = False) -> Normaliser:
    def norm(v: Any, path: str) -> int | None:
        if v is None and nullable:
            return None
        n = canon_number(v, path)
        if not isinstance(n, int):
            raise InvalidRequestError(path, f"expected an integer, got {v!r}", "send an integer")
        if n < lo or (hi is not None and n > hi):
            bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise InvalidRequestError(path, f"{n} is out of range", f"use an integer {bound}")
        return n

    return norm


def _bool(v: Any, path: str) -> bool:
    # An explicit null never gets here: canonicalize keeps the field's default for it.
    if not isinstance(v, bool):
        raise InvalidRequestError(path, f"expected a boolean, got {_tname(v)}",
                                  "send true or false")
    return v


def _opt_str(v: Any, path: str) -> str | None:
    if v is None or type(v) is str:
        return v
    raise InvalidRequestError(path, f"expected a string, got {_tname(v)}", "send a string")


def _any(v: Any, path: str) -> Any:
    if type(v) is dict or type(v) is list:
        return canon_json(v, path)
    return canon_value(v, path)


def _stop(v: Any, path: str) -> ExtType:
    # NOTE: stop sequences act as a set (generation halts at whichever appears first), so order
    # and duplicates fold; a different set never does.
    if v is None:
        return _EMPTY_LIST
    if type(v) is str:
        return _as_json([v], path)
    if not isinstance(v, list):
        raise InvalidRequestError(path, f"expected a string or an array, got {_tname(v)}",
                                  "send a string or an array of strings")
    for i, s in enumerate(v):
        if type(s) is not str:
            raise InvalidRequestError(f"{path}[{i}]", f"expected a string, got {_tname(s)}",
                                      "send stop sequences as strings")
    return _as_json(sorted(set(v)), path)


def _logit_bias(v: Any, path: str) -> ExtType:
    if v is None:
        return _EMPTY_OBJECT
    if not isinstance(v, Mapping):
        raise InvalidRequestError(path, f"expected an object, got {_tname(v)}",
                                  "map token ids to biases")
    out: dict[str, int | float] = {}
    for k in sorted(v, key=_key_order(path)):
        # NOTE: only the canonical decimal spelling of a 64-bit id is accepted, and keyed as
        # sent. str.isdigit() also passes "²" and "٣" (int("٣") == 3), and folding " 3" or
        # "03" into "3" would key a request the model may read differently.
        if _TOKEN_ID.fullmatch(k) is None or not INT64_MIN <= int(k) <= UINT64_MAX:
            raise InvalidRequestError(f"{path}.{k}", "logit_bias keys are token ids",
                                      'write each id in ASCII decimal digits, e.g. "50256"')
        out[k] = _BIAS(v[k], f"{path}.{k}")
    return _as_json(out, path)


_TOKEN_ID = re.compile(r"0|-?[1-9][0-9]{0,19}", re.ASCII)


def _tools(v: Any, path: str) -> ExtType:
    if v is None:
        return _EMPTY_LIST
    if type(v) is not list:
        raise InvalidRequestError(path, f"expected an array, got {_tname(v)}",
                                  "send tools as an array")
    tools = []
    for i, t in enumerate(v):
        if type(t) is not dict and not isinstance(t, Mapping):
            raise InvalidRequestError(f"{path}[{i}]", f"expected an object, got {_tname(t)}",
                                      "send each tool as an object")
        fn = t.get("function")
        if ((type(fn) is dict or isinstance(fn, Mapping)) and fn.get("strict") is None
                and t.get("type") == "function"):
            # `strict` defaults to false: an omitted flag and an explicit false are the same
            # tool. Shallow copies: the caller's request is not changed.
            fn = dict(fn)
            fn["strict"] = False
            t = dict(t)
            t["function"] = fn
        tools.append(t)
    return canon_json(tools, path)


def _response_format(v: Any, path: str) -> Any:
    if v is None:
        return _TEXT_FORMAT
    if not isinstance(v, Mapping):
        raise InvalidRequestError(path, f"expected an object, got {_tname(v)}",
                                  'send {"type": "text"}, json_object or json_schema')
    return canon_json(v, path)


def _content_part(p: Any, path: str) -> Any:
    """Fold one content part, already canonical JSON."""
    if type(p) is not dict:
        raise InvalidRequestError(path, f"expected a content part object, got {_tname(p)}",
                                  'send {"type": "text", "text": ...} or another part type')
    kind = p.get("type")
    if type(kind) is not str:
        raise InvalidRequestError(f"{path}.type", "a content part needs a string type",
                                  'set "type" to text, image_url, input_audio or file')
    if kind == "text" and type(p.get("text")) is not str:
        raise InvalidRequestError(f"{path}.text", "a text part needs a string text",
                                  "send the text as a string")
    if kind == "image_url":
        img = p.get("image_url")
        if type(img) is str:
            img = {"url": img}
        if type(img) is not dict or type(img.get("url")) is not str:
            raise InvalidRequestError(f"{path}.image_url", "an image part needs a url",
                                      'send {"image_url": {"url": ...}}')
        if img.get("detail") is None:
            img["detail"] = "auto"
        p["image_url"] = dict(sorted(img.items()))
    return p


def _content(v: Any, path: str) -> Any:
    """Fold a message's content, already canonical JSON."""
    if v is None or type(v) is str:
        return v
    if type(v) is not list:
        raise InvalidRequestError(path, f"expected a string, an array of parts or null, "
                                  f"got {_tname(v)}", "send content as a string or parts")
    parts = [_content_part(p, f"{path}[{i}]") for i, p in enumerate(v)]
    if len(parts) == 1 and parts[0].keys() == {"type", "text"} and parts[0]["type"] == "text":
        # NOTE: a one-text-part list is the same prompt as the bare string; several text parts
        # are not folded (providers differ in how they join them).
        return parts[0]["text"]
    return parts


_MESSAGE_OPTIONALS = ("tool_calls", "name")


def _plain_messages(v: list[Any]) -> bool:
    """The common case: every message is a dict of exactly a non-empty string ``role`` and a
    string ``content``. Such a list is canonical as it stands (orjson sorts the keys)."""
    # NOTE: subscripts under one try rather than .get() calls, and the types in locals: the
    # loop runs once per message of every request.
    d, s = dict, str
    try:
        for m in v:
            if (type(m) is not d or len(m) != 2 or type(m["content"]) is not s
                    or type(role := m["role"]) is not s or not role):
                return False
    except KeyError:
        return False
    return True


def _messages(v: Any, path: str) -> ExtType:
    if type(v) is not list:
        raise InvalidRequestError(path, f"expected an array, got {_tname(v)}",
                                  "send messages as an array of {role, content} objects")
    if not v:
        raise InvalidRequestError(path, "no messages", "send at least one message")
    if _plain_messages(v):
        return _as_json(v, path)
    out = []
    for i, m in enumerate(v):
        if type(m) is dict and len(m) == 2:
            role, content = m.get("role"), m.get("content")
            if type(role) is str and role and type(content) is str:
                out.append({"content": content, "role": role})
                continue
        if type(m) is not dict and not isinstance(m, Mapping):
            raise InvalidRequestError(f"{path}[{i}]", f"expected an object, got {_tname(m)}",
                                      "send each message as {role, content}")
        m = canon_value(m, f"{path}[{i}]")
        role = m.get("role")
        if type(role) is not str or not role:
            raise InvalidRequestError(f"{path}[{i}].role", "missing or non-string role",
                                      "set role to system, developer, user, assistant or tool")
        m["content"] = _content(m.get("content"), f"{path}[{i}].content")
        for optional in _MESSAGE_OPTIONALS:
            # An absent optional and an explicit null/empty say the same thing.
            if optional in m and m[optional] in (None, []):
                del m[optional]
        out.append(m)
    return _as_json(out, path)


def _prompt(v: Any, path: str) -> Any:
    p = _prompt_value(v, path)
    return p if type(p) is str else _as_json(p, path)


def _prompt_value(v: Any, path: str) -> Any:
    if type(v) is str:
        return v
    if not isinstance(v, list) or not v:
        raise InvalidRequestError(path, f"expected a string or a non-empty array, got {_tname(v)}",
                                  "send a string, strings, token ids or arrays of token ids")
    if all(type(x) is str for x in v):
        return v[0] if len(v) == 1 else list(v)
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        ids = [canon_number(x, f"{path}[{i}]") for i, x in enumerate(v)]
        for i, x in enumerate(ids):
            if not isinstance(x, int) or x < 0:
                raise InvalidRequestError(f"{path}[{i}]", f"{x!r} is not a token id",
                                          "send non-negative integer token ids")
        return ids
    if all(isinstance(x, list) for x in v):
        rows = [_prompt_value(x, f"{path}[{i}]") for i, x in enumerate(v)]
        if any(not isinstance(r, list) for r in rows):
            raise InvalidRequestError(path, "nested prompts must be arrays of token ids",
                                      "send [[id, ...], ...]")
        return rows[0] if len(rows) == 1 else rows
    raise InvalidRequestError(path, "mixed prompt array", "send only strings or only token ids")


_EMPTY_LIST = ExtType(JSON_EXT, b"[]")
_EMPTY_OBJECT = ExtType(JSON_EXT, b"{}")
_TEXT_FORMAT = ExtType(JSON_EXT, b'{"type":"text"}')


@dataclass(frozen=True, slots=True)
class _Spec:
    default: Any
    norm: Normaliser


#: The normaliser of each keyed value type of the field table that is not a bounded number.
_NORMALISERS: dict[str, Normaliser] = {
    "boolean": _bool,
    "string": _opt_str,
    "json": _any,
    "messages": _messages,
    "prompt": _prompt,
    "stop": _stop,
    "logit_bias": _logit_bias,
    "tools": _tools,
    "response_format": _response_format,
}


def _spec(k: Keyed) -> _Spec:
    if k.type == "number":
        assert k.lo is not None and k.hi is not None, "a number field needs both bounds"
        return _Spec(k.default, _number_in(k.lo, k.hi))
    if k.type == "integer":
        assert k.lo is not None, "an integer field needs a lower bound"
        return _Spec(k.default, _int_in(k.lo, k.hi, nullable=k.nullable))
    return _Spec(k.default, _NORMALISERS[k.type])


# NOTE: built from keying.fields, the one table the service and the engine read too.
CHAT_FIELDS: dict[str, _Spec] = {name: _spec(k) for name, k in keyed_specs("chat").items()}
COMPLETION_FIELDS: dict[str, _Spec] = {
    name: _spec(k) for name, k in keyed_specs("completion").items()
}

_REQUIRED = {
    kind: next(name for name, k in keyed_specs(kind).items() if k.required)
    for kind in ("chat", "completion")
}


def _defaults(specs: dict[str, _Spec]) -> dict[str, Any]:
    out = {}
    for name in sorted(specs):
        spec = specs[name]
        try:
            out[name] = spec.norm(spec.default, name)
        except InvalidRequestError:
            out[name] = None  # required fields; checked separately
    return out


# Canonical defaults in key order, computed once; every value is immutable (scalars, ExtType).
_CHAT_DEFAULTS = _defaults(CHAT_FIELDS)
_COMPLETION_DEFAULTS = _defaults(COMPLETION_FIELDS)
_DEFAULTS_OF: dict[str, dict[str, Any]] = {"chat": _CHAT_DEFAULTS,
                                           "completion": _COMPLETION_DEFAULTS}
