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

This module holds the request: :func:`canonicalize` and its types. The canonical JSON of values
is :mod:`keying.canonical_json`; each field's normaliser is :mod:`keying.normalisers`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import orjson
from msgpack import ExtType

from keying.canonical_json import _check_text, _tname
from keying.errors import InvalidRequestError, RequestTooLargeError
from keying.fields import unkeyed_names
from keying.framing import frame_presorted
from keying.normalisers import (
    _CHAT_DEFAULTS,
    _COMPLETION_DEFAULTS,
    _DEFAULTS_OF,
    _EMPTY_LIST,
    _REQUIRED,
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    _any,
)

__all__ = [
    "CLIENT_TOOL_TYPES",
    "UNKEYED_FIELDS",
    "CanonicalRequest",
    "KeyLimits",
    "RequestKind",
    "canonicalize",
    "detect_kind",
    "hosted_tool",
]

RequestKind = Literal["chat", "completion", "generic"]

#: Fields that cannot change the model's output (the :class:`keying.fields.Unkeyed` rows of
#: the field table). They are ignored by the key, and ``explain`` lists the ones a request
#: carried. Everything not listed here is keyed.
UNKEYED_FIELDS: frozenset[str] = unkeyed_names()


@dataclass(frozen=True, kw_only=True, slots=True)
class KeyLimits:
    """Bounds on what the key builder accepts. Exceeding one is a ``RequestTooLargeError``.

    ``max_bytes`` bounds the canonical encoding of the request's keyed fields.
    """

    max_bytes: int = 8 * 1024 * 1024


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
