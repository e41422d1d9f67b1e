"""Parse an OpenAI-style request into its canonical form.

The canonical form is what the key is built from. Its rules:

* every output-affecting field of the API is present with its default made explicit
  (an omitted ``temperature`` is ``1``, not ``0``);
* equivalent spellings fold: a string content and a one-text-part list; ``1`` and ``1.0``;
  ``-0.0`` and ``0.0``; JSON object key order; ``null`` and an omitted optional field;
  ``stop`` as a string, a list, or the same set in another order;
* different meanings never fold: message order, tool order, a different stop set, any change
  inside a text, a different role;
* fields the parser does not know are keyed as given, never dropped (fail closed);
* fields that cannot change the output are listed in :data:`UNKEYED_FIELDS` and reported.

All numbers are normalised the same way: an integral float within 2**53 becomes an int,
``-0.0`` becomes ``0``; NaN and infinities are rejected. ``True`` is never folded with ``1``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import orjson
from msgpack import ExtType

from keying.errors import InvalidRequestError, RequestTooLargeError
from keying.fields import Keyed, keyed_specs, unkeyed_names
from keying.framing import frame_presorted

RequestKind = Literal["chat", "completion", "generic"]

#: Fields that cannot change the model's output (the :class:`keying.fields.Unkeyed` rows of
#: the field table). They are ignored by the key, and ``explain`` lists the ones a request
#: carried. Everything not listed here is keyed.
UNKEYED_FIELDS: frozenset[str] = unkeyed_names()

_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1
_EXACT_FLOAT = 2**53
#: Most containers nested inside one field's value (more is a RequestTooLargeError); the same as
#: orjson's limit, so the fast and the checked paths accept exactly the same values.
MAX_DEPTH = 254


@dataclass(frozen=True, kw_only=True, slots=True)
class KeyLimits:
    """Bounds on what the key builder accepts. Exceeding one is a ``RequestTooLargeError``.

    ``max_bytes`` bounds the canonical encoding of the request's keyed fields.
    """

    max_bytes: int = 8 * 1024 * 1024


#: msgpack extension code for a canonical JSON document (sorted keys, folded numbers, compact).
JSON_EXT = 1


class CanonicalRequest(NamedTuple):
    """A request reduced to what decides its output.

    ``keyed`` maps each keyed field to its canonical value: a scalar, or for an array or object
    a ``msgpack.ExtType(JSON_EXT, canonical JSON bytes)``. ``encoded`` is the canonical msgpack
    encoding of ``keyed``, computed once and reused by the key material. ``fields`` decodes
    ``keyed`` to plain JSON values (for ``explain`` and for people).

    NOTE: an immutable NamedTuple rather than a frozen dataclass: building a frozen dataclass
    costs a call per field, more than a fifth of keying a small request. Build it by keyword.
    """

    kind: RequestKind
    model: str
    keyed: dict[str, Any]
    encoded: bytes
    unkeyed: tuple[str, ...] = ()
    #: Some tool is not one the client runs itself (see :func:`hosted_tool`).
    hosted_tool: bool = False

    @property
    def fields(self) -> dict[str, Any]:
        return {k: orjson.loads(v.data) if type(v) is ExtType else v for k, v in self.keyed.items()}

    def body(self, *, minimal: bool = False) -> dict[str, Any]:
        """The request as a body again: the model and the keyed fields, decoded. ``minimal``:
        without the fields that hold their canonical default, which keys exactly the same (an
        absent field is its default) and is what an upstream expects (no ``tool_choice``
        without tools, no explicit nulls for options it may not know)."""
        defaults = _DEFAULTS_OF.get(self.kind, {}) if minimal else {}
        out: dict[str, Any] = {"model": self.model}
        for name, v in self.keyed.items():
            d = defaults.get(name, _NO_DEFAULT)
            if type(v) is type(d) and v == d:  # canonical values: equal means same encoding
                continue
            out[name] = orjson.loads(v.data) if type(v) is ExtType else v
        if minimal and out.get("tool_choice") == "none" and "tools" not in out:
            del out["tool_choice"]  # derived: no tools means "none"
        return out


class _Invalid(Exception):
    """The fast path met something it does not handle; the checked path says what it is."""


def _fold(v: Any, depth: int, max_depth: int) -> Any:
    # NOTE: the hot path. Exact type checks, no path strings: anything unusual raises _Invalid
    # and `canon_value` re-walks the value with full checks to name the field.
    t = type(v)
    if t is str or v is None or t is bool:
        return v
    if t is dict:
        if depth >= max_depth:
            raise _Invalid
        out = {}
        for k in sorted(v):
            if type(k) is not str:
                raise _Invalid
            out[k] = _fold(v[k], depth + 1, max_depth)
        return out
    if t is list:
        if depth >= max_depth:
            raise _Invalid
        return [_fold(x, depth + 1, max_depth) for x in v]
    if t is int:
        if _INT_MIN <= v <= _INT_MAX:
            return v
        raise _Invalid
    if t is float:
        if v - v != 0.0:  # NaN or an infinity
            raise _Invalid
        if v.is_integer() and -_EXACT_FLOAT <= v <= _EXACT_FLOAT:
            return int(v)
        return v
    raise _Invalid


def canon_number(value: Any, path: str) -> int | float:
    """Fold one JSON number: integral floats become ints, -0.0 becomes 0; reject NaN and inf."""
    t = type(value)
    if t is int and _INT_MIN <= value <= _INT_MAX:
        return value  # type: ignore[no-any-return]  # an int: `t is int` (no cast on the hot path)
    if t is float and value - value == 0.0:
        return int(value) if value.is_integer() and abs(value) <= _EXACT_FLOAT else value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(path, f"expected a number, got {_tname(value)}", "send a number")
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise InvalidRequestError(path, "integer out of range", "use a 64-bit integer")
        return int(value)
    if math.isnan(value) or math.isinf(value):
        raise InvalidRequestError(path, f"{value} is not a finite number", "send a finite number")
    if value.is_integer() and abs(value) <= _EXACT_FLOAT:
        return int(value)
    return float(value)


def _fast_json(value: Any) -> bytes | None:
    """Canonical JSON of a container in one C pass, or None when it might need folding.

    NOTE: orjson sorts the keys, validates the types and refuses more than MAX_DEPTH nested
    containers. Its output is taken as canonical only when nothing in it can need folding: no
    ".0" (orjson writes integral floats and -0.0 as "1.0", "-0.0") and no null (orjson writes
    NaN and infinities as null). Text that merely contains those bytes takes the checked path,
    which gives the same result, slower.
    """
    if type(value) is not dict and type(value) is not list:
        return None
    try:
        raw = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        return None
    return raw if _DOT_ZERO.search(raw) is None and _NULL.search(raw) is None else None


# NOTE: compiled patterns rather than ``b".0" in raw``: for these short needles re's literal
# search is about twice as fast as bytes' own (bench/keying.py's typical request has 1.6 KB of
# tool schemas to scan).
_DOT_ZERO = re.compile(rb"\.0")
_NULL = re.compile(rb"null")


def canon_value(value: Any, path: str) -> Any:
    """Canonicalise any JSON value: sorted maps, folded numbers, validated types.

    The nesting limit counts from the value itself (``MAX_DEPTH`` containers), the same on
    every path.
    """
    t = type(value)
    if t is str or t is bool or value is None:
        # Canonical as they stand (a lone surrogate is found where the fields are framed).
        return value
    raw = _fast_json(value)
    if raw is not None:
        return orjson.loads(raw)
    return _slow_canon(value, path)


def _slow_canon(value: Any, path: str) -> Any:
    """What :func:`canon_value` does when the one-pass C encoding cannot be taken as is."""
    try:
        return _fold(value, 0, MAX_DEPTH)
    except (_Invalid, TypeError):
        return _checked(value, path, 0, MAX_DEPTH)


def _json_ext(data: bytes) -> ExtType:
    # NOTE: ExtType's own constructor re-checks its arguments in Python, which costs more than
    # the rest of keying a small request; ours are always (JSON_EXT, bytes).
    return tuple.__new__(ExtType, (JSON_EXT, data))


def canon_json(value: Any, path: str) -> ExtType:
    """The canonical JSON document of any JSON value, tagged for framing."""
    raw = _fast_json(value)
    if raw is not None:
        return _json_ext(raw)
    return _as_json(_slow_canon(value, path), path)


def _as_json(value: Any, path: str) -> ExtType:
    """Tag a value that is already canonical (numbers folded) as a canonical JSON document."""
    try:
        return _json_ext(orjson.dumps(value, option=orjson.OPT_SORT_KEYS))
    except orjson.JSONEncodeError:
        _checked(value, path, 0, 10**6)  # names the field with text that is not valid Unicode
        raise


def _checked(value: Any, path: str, depth: int, max_depth: int) -> Any:
    if depth >= max_depth and isinstance(value, (Mapping, list, tuple)):
        raise RequestTooLargeError(
            path, f"nested deeper than {max_depth} levels", "flatten the value"
        )
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        _check_text(value, path)
        return str(value)
    if isinstance(value, (int, float)):
        return canon_number(value, path)
    if isinstance(value, Mapping):
        out = {}
        for k in sorted(value, key=_key_order(path)):
            out[k] = _checked(value[k], f"{path}.{k}", depth + 1, max_depth)
        return out
    if isinstance(value, (list, tuple)):
        return [_checked(v, f"{path}[{i}]", depth + 1, max_depth) for i, v in enumerate(value)]
    raise InvalidRequestError(path, f"unsupported type {_tname(value)}", "send JSON values only")


def _check_text(value: str, path: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(
            path, "text is not valid Unicode (a lone surrogate)", "send valid UTF-8 text"
        ) from None


def _key_order(path: str) -> Callable[[Any], str]:
    def order(k: Any) -> str:
        if not isinstance(k, str):
            raise InvalidRequestError(path, "object keys must be strings", "use string keys")
        return k

    return order


def _tname(v: Any) -> str:
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
        type(None): "null",
    }.get(type(v), type(v).__name__)


# --- field normalisers -------------------------------------------------------------------------

Normaliser = Callable[[Any, str], Any]


def _number_in(lo: float, hi: float) -> Normaliser:
    def norm(v: Any, path: str) -> int | float:
        n = canon_number(v, path)
        if not lo <= n <= hi:
            raise InvalidRequestError(path, f"{n} is out of range", f"use a value in [{lo}, {hi}]")
        return n

    return norm


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
        if _TOKEN_ID.fullmatch(k) is None or not _INT_MIN <= int(k) <= _INT_MAX:
            raise InvalidRequestError(f"{path}.{k}", "logit_bias keys are token ids",
                                      'write each id in ASCII decimal digits, e.g. "50256"')
        out[k] = _number_in(-100, 100)(v[k], f"{path}.{k}")
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
_NO_DEFAULT = object()


_DEFAULT_LIMITS = KeyLimits()


def detect_kind(body: Mapping[str, Any]) -> RequestKind:
    """Guess the request kind from its shape: ``messages`` is chat, ``prompt`` a completion."""
    if "messages" in body:
        return "chat"
    if "prompt" in body:
        return "completion"
    return "generic"


def canonicalize(
    body: Any,
    kind: RequestKind | None = None,
    limits: KeyLimits | None = None,
) -> CanonicalRequest:
    """Reduce ``body`` (a parsed JSON request) to its canonical form, validating as it goes."""
    if type(body) is not dict and not isinstance(body, Mapping):
        raise InvalidRequestError("request", f"expected a JSON object, got {_tname(body)}",
                                  "send the request body as an object")
    limits = limits or _DEFAULT_LIMITS
    kind = kind or detect_kind(body)
    model = body.get("model")
    if type(model) is not str or not model:
        raise InvalidRequestError("model", "missing or not a non-empty string",
                                  'set "model" to the model id')
    if kind == "chat":
        specs, defaults = CHAT_FIELDS, _CHAT_DEFAULTS
    elif kind == "completion":
        specs, defaults = COMPLETION_FIELDS, _COMPLETION_DEFAULTS
    else:
        specs, defaults = {}, {}
    required = _REQUIRED.get(kind)
    if required is not None and body.get(required) is None:
        raise InvalidRequestError(required, "missing", f'send "{required}"')

    # NOTE: start from the defaults in key order; assigning a known field keeps that order, so
    # only requests with unknown fields need a final sort.
    fields: dict[str, Any] = defaults.copy()
    unkeyed: list[str] = []
    needs_sort = False
    for name, value in body.items():
        spec = specs.get(name)  # known fields first: most of a request
        if spec is not None:
            if value is not None:  # an explicit null is the default, already in place
                fields[name] = spec.norm(value, name)
            continue
        if type(name) is not str:
            raise InvalidRequestError("request", "object keys must be strings", "use string keys")
        if name == "model":
            continue
        if name in UNKEYED_FIELDS:
            unkeyed.append(name)
            continue
        # Unknown to us: keyed exactly as given (canonical JSON). Fail closed.
        fields[name] = _any(value, name)
        needs_sort = True
    if kind == "chat" and fields["tool_choice"] is None:
        fields["tool_choice"] = "none" if fields["tools"] == _EMPTY_LIST else "auto"
    if needs_sort:
        fields = dict(sorted(fields.items()))
    try:
        encoded = frame_presorted(fields)
    except UnicodeEncodeError:
        # Arrays and objects are already canonical JSON (orjson validated their text), so the
        # bad text is in a string field: name it.
        for name, value in fields.items():
            if type(value) is str:
                _check_text(value, name)
        raise
    if len(encoded) > limits.max_bytes:
        largest = max(fields, key=lambda n: len(frame_presorted(fields[n])))
        raise RequestTooLargeError(
            largest,
            f"request is {len(encoded)} bytes canonically, over the {limits.max_bytes}-byte "
            "key limit",
            "send a smaller request or raise the limit",
        )
    # NOTE: the fields in order through _make, cheaper than a keyword call (see the class).
    return _make_canonical((kind, model, fields, encoded,
                            tuple(sorted(unkeyed)) if unkeyed else (),
                            hosted_tool(body.get("tools"))))


_make_canonical = CanonicalRequest._make
assert CanonicalRequest._fields == ("kind", "model", "keyed", "encoded", "unkeyed", "hosted_tool")


#: Tool types the client runs itself; the provider runs every other type (a hosted tool).
CLIENT_TOOL_TYPES = frozenset({"function", "custom"})


def hosted_tool(tools: Any) -> bool:
    """Whether a request's ``tools`` value asks the provider to run a tool: anything but an
    absent or empty list, or a list of objects each of a client-run type.

    NOTE: read from the request as sent while it is canonicalised, not from the canonical JSON
    afterwards: parsing that again cost a fifth of keying a typical request with tools.
    Canonicalising never changes a tool's ``type``, so both readings agree.
    """
    if tools is None or (type(tools) is list and not tools):
        return False
    if type(tools) is not list:
        return True
    for t in tools:
        if (type(t) is not dict and not isinstance(t, Mapping)) \
                or t.get("type") not in CLIENT_TOOL_TYPES:
            return True
    return False
