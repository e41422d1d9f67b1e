"""Safe components for storage keys.

A tenant id, model name or version placed into a Redis key must not change the key's structure
(``:`` separators, ``{}`` hash tags) or widen a glob purge pattern (``*``, ``?``, ``[``, ``\\``).
Components are percent-escaped to a small alphabet; a long one is replaced by a digest so key
length stays bounded, with a marker that cannot come from escaping.
"""

from __future__ import annotations

import functools
import hashlib
import re

_SAFE = re.compile(r"[A-Za-z0-9_.\-]")
_ALL_SAFE = re.compile(r"[A-Za-z0-9_.\-]*")
MAX_COMPONENT = 96


@functools.lru_cache(maxsize=4096)
def escape_component(value: str) -> str:
    """Escape one storage-key component: only ``[A-Za-z0-9_.-%]`` remain, length is bounded.

    Injective: distinct inputs give distinct outputs (escaping is reversible, and the digest
    form starts with ``~`` which escaping never produces).
    """
    # NOTE: few distinct components exist at a time (tenants, models), hence the cache; most
    # need no escaping at all, hence the one-regex fast path.
    if len(value) <= MAX_COMPONENT and _ALL_SAFE.fullmatch(value):
        return value
    out = "".join(ch if _SAFE.fullmatch(ch) else _pct(ch) for ch in value)
    if len(out) > MAX_COMPONENT:
        return "~" + hashlib.blake2b(value.encode("utf-8"), digest_size=20).hexdigest()
    return out


def _pct(ch: str) -> str:
    return "".join(f"%{b:02X}" for b in ch.encode("utf-8"))
