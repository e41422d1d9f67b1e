"""The request's ``Cache-Control`` header: what the client allows the cache to do."""

from __future__ import annotations

from dataclasses import dataclass

from cachesvc.errors import BadRequestError


@dataclass(frozen=True, kw_only=True, slots=True)
class CacheControl:
    no_cache: bool = False  # skip the lookup, still fill
    no_store: bool = False  # never store this response
    max_age: int | None = None  # accept only hits younger than this many seconds
    only_if_cached: bool = False  # 504 rather than calling the upstream


NONE = CacheControl()
_MAX_DELTA_SECONDS = 2**31


def parse_cache_control(header: str | None) -> CacheControl:
    """Parse the directives this cache honours; unknown directives are ignored (RFC 9111)."""
    if not header:
        return NONE
    flags: dict[str, object] = {}
    for raw in header.split(","):
        part = raw.strip()
        if not part:
            continue
        name, _, value = part.partition("=")
        name = name.strip().lower()
        value = value.strip().strip('"')
        if name == "no-cache":
            flags["no_cache"] = True
        elif name == "no-store":
            flags["no_store"] = True
        elif name == "only-if-cached":
            flags["only_if_cached"] = True
        elif name == "max-age":
            # ASCII digits only: str.isdigit() also passes "²", which int() refuses.
            if not (value.isascii() and value.isdigit()):
                raise BadRequestError(
                    f"Cache-Control max-age={value!r} is not a non-negative integer",
                    field="Cache-Control", fix="send max-age=N with N whole seconds",
                )
            # RFC 9111 5.2.1.1: a delta-seconds too large to hold is 2**31 (and int() of
            # thousands of digits raises).
            digits = value.lstrip("0") or "0"
            flags["max_age"] = (min(int(digits), _MAX_DELTA_SECONDS) if len(digits) <= 10
                                else _MAX_DELTA_SECONDS)
    return CacheControl(**flags)  # type: ignore[arg-type]
