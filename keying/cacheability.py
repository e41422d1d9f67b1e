"""Whether a request's output is reproducible, and so safe to serve from a cache."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from keying.canonical import CanonicalRequest


@dataclass(frozen=True, kw_only=True, slots=True)
class Cacheability:
    """``cacheable`` with the reason; a non-cacheable request bypasses the cache.

    ``reproducible``: the answer is a function of the request (greedy, or seeded), so a
    recompute must match it exactly; an opted-in sampled request is cacheable but not this.
    """

    cacheable: bool
    reason: str
    reproducible: bool = False


#: Fields whose presence means the output depends on the live world, not on the request alone.
LIVE_DATA_FIELDS = ("web_search_options",)


_GREEDY = Cacheability(cacheable=True, reason="deterministic: temperature=0", reproducible=True)


def assess(request: CanonicalRequest, *, allow_nondeterministic: bool = False) -> Cacheability:
    """Decide cacheability. Non-reproducible requests bypass unless the tenant opted in."""
    f = request.keyed
    if (
        f.get("temperature") == 0
        and f.get("seed") is None
        and f.get("n", 1) == 1
        and f.get("best_of", 1) == 1
        and all(f.get(name) is None for name in LIVE_DATA_FIELDS)
    ):
        return _GREEDY  # the common case, decided without building a reason
    reason = _nondeterminism(request)
    if reason is None:
        seed = request.keyed.get("seed")
        return _GREEDY if seed is None else _seeded(seed)
    if allow_nondeterministic:
        return Cacheability(cacheable=True, reason=f"opted in: {reason}")
    return Cacheability(cacheable=False, reason=reason)


@functools.lru_cache(maxsize=1024)
def _seeded(seed: int) -> Cacheability:
    # Agents send the same few seeds again and again; the verdict is a value, built once.
    return Cacheability(cacheable=True, reason=f"seeded: seed={seed}", reproducible=True)


def _nondeterminism(request: CanonicalRequest) -> str | None:
    f = request.keyed
    for name in LIVE_DATA_FIELDS:
        if f.get(name) is not None:
            return f"live data: {name} makes the answer depend on when it is asked"
    seed = f.get("seed")
    temperature = f.get("temperature", 1)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        return "nondeterministic: temperature is not a number"
    if seed is not None:
        return None
    if temperature > 0:
        return f"nondeterministic: temperature={temperature} > 0 and no seed"
    n = f.get("n", 1)
    if n != 1:
        return f"nondeterministic: n={n} > 1 and no seed"
    best_of = f.get("best_of", 1)
    if best_of != 1:
        return f"nondeterministic: best_of={best_of} > 1 and no seed"
    return None
