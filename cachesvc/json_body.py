"""What the service refuses in a request body it parsed itself, because the body it would key
is not exactly what the model receives.

orjson (the service's parser) reads an integer literal beyond 64 bits as a float, so
``100000000000000000000001`` and ``100000000000000000000002`` become the same number: through
the cache API the gateway sends its own bytes to the model, so two different requests would
share one answer. And orjson reads one level of nesting more than it writes, so a body nested
that deep would be keyed, then fail when the proxy sends it upstream. Both are refused with a
400 naming the problem. The checks run only when a body is keyed (not on a repeat of bytes the
service already keyed), and their fast tests are single C passes over the bytes.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from cachesvc.errors import BadRequestError
from keying.fields import INT64_MIN, UINT64_MAX

_INT_MIN, _INT_MAX = INT64_MIN, UINT64_MAX  # the range orjson reads and keying accepts
#: Maps every ASCII digit to "0": a run of 19 zeros afterwards is a run of 19 digits, the
#: fewest an integer outside the range has (-9223372036854775809).
_DIGITS = bytes.maketrans(b"123456789", b"000000000")
_LONG_RUN = b"0" * 19
#: orjson writes at most this many nested containers (it reads one more).
_MAX_WRITABLE_DEPTH = 254


def check_exact(raw: bytes, body: Any) -> None:
    """Raise ``BadRequestError`` when ``body`` (parsed from ``raw`` by orjson) is not exactly
    what ``raw`` says, or cannot be written back."""
    if len(raw) >= 19 and _LONG_RUN in raw.translate(_DIGITS):
        # A long digit run may be text or a number: the standard parser keeps integers exact.
        json.loads(raw, parse_int=_exact_int)
    if raw.count(b"[") + raw.count(b"{") > _MAX_WRITABLE_DEPTH:
        try:
            orjson.dumps(body)
        except orjson.JSONEncodeError:
            raise BadRequestError(f"the body is nested deeper than {_MAX_WRITABLE_DEPTH} levels",
                                  field="body", fix="flatten the request") from None


def _exact_int(text: str) -> int:
    value = int(text)
    if not _INT_MIN <= value <= _INT_MAX:
        raise BadRequestError(
            f"the integer {text[:40]} is outside the 64-bit range, so it cannot be keyed exactly "
            "(a JSON parser reads it as an approximate float)", field="body",
            fix="send integers within -2**63..2**64-1, or send the value as a string")
    return value
