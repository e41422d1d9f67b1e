"""Canonical JSON of a value: sorted maps, folded numbers, validated types.

Every keyed array or object becomes one canonical JSON document (:func:`canon_json`), so two
spellings of the same value frame to the same bytes. Numbers fold the same way everywhere: an
integral float within 2**53 becomes an int, ``-0.0`` becomes ``0``; NaN and infinities are
rejected. ``True`` is never folded with ``1``. Values nest at most :data:`MAX_DEPTH` containers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from msgpack import ExtType

from keying.errors import InvalidRequestError, RequestTooLargeError
from keying.fields import INT64_MIN as _INT_MIN
from keying.fields import UINT64_MAX as _INT_MAX

_EXACT_FLOAT = 2**53
#: Most containers nested inside one field's value (more is a RequestTooLargeError); the same as
#: orjson's limit, so the fast and the checked paths accept exactly the same values.
MAX_DEPTH = 254

#: msgpack extension code for a canonical JSON document (sorted keys, folded numbers, compact).
JSON_EXT = 1


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
