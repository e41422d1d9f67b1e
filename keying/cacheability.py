"""Whether a request's output is reproducible, and so safe to serve from a cache.

Two things make an answer unsafe to replay: sampling without a seed (another call would give
another answer; a tenant may opt in to caching those), and *live data*: the provider looks
something up when it answers (the web, a search index, a remote tool), so the same request
asked tomorrow has another right answer. Live-data requests always bypass the cache, opted in
or not. They are recognised by the table :data:`LIVE_DATA_RULES`:

=====================  =========================================================  ============
rule                   what the request carries                                   provider
=====================  =========================================================  ============
web_search_options     ``web_search_options`` (any value but null)                OpenAI
search_parameters      ``search_parameters`` (any value but null)                 xAI
plugins                ``plugins``: any plugin (``{"id": "web"}`` is web search;   OpenRouter
                       the others run on the provider's side too)
online model           a model name ending in ``:online``                         OpenRouter
hosted tools           a ``tools`` entry whose type is not ``function`` or        OpenAI,
                       ``custom`` (``web_search``, ``web_search_preview``,         Anthropic,
                       ``file_search``, ``code_interpreter``, ``mcp``,             and others
                       ``computer_use_preview``, ``web_search_20250305``, ...)
=====================  =========================================================  ============

NOTE: the tool rule names the two types a client runs itself and treats every other type as
hosted (fail closed): a new hosted tool type bypasses before anyone adds it here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from msgpack import ExtType

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


@dataclass(frozen=True, kw_only=True, slots=True)
class LiveDataRule:
    """One way a request asks the provider for live data: ``applies(request)`` says whether
    it does."""

    name: str
    applies: Callable[[CanonicalRequest], bool]


def _field(name: str) -> Callable[[CanonicalRequest], bool]:
    return lambda r: r.keyed.get(name) is not None


def _any_plugin(r: CanonicalRequest) -> bool:
    plugins = r.keyed.get("plugins")
    return plugins is not None and not _empty(plugins)


def _empty(value: object) -> bool:
    return type(value) is ExtType and value.data == b"[]"


LIVE_DATA_RULES: tuple[LiveDataRule, ...] = (
    LiveDataRule(name="web_search_options", applies=_field("web_search_options")),
    LiveDataRule(name="search_parameters", applies=_field("search_parameters")),
    LiveDataRule(name="plugins", applies=_any_plugin),
    LiveDataRule(name="an :online model", applies=lambda r: r.model.endswith(":online")),
    LiveDataRule(name="a hosted tool", applies=lambda r: r.hosted_tool),
)


def live_data(request: CanonicalRequest) -> str | None:
    """The first live-data rule the request meets, or None."""
    for name, applies in _RULES:
        if applies(request):
            return name
    return None


# NOTE: (name, applies) pairs read once: attribute reads on the frozen rules cost a fifth of
# assessing a request.
_RULES = tuple((rule.name, rule.applies) for rule in LIVE_DATA_RULES)


_GREEDY = Cacheability(cacheable=True, reason="deterministic: temperature=0", reproducible=True)


def assess(request: CanonicalRequest, *, allow_nondeterministic: bool = False) -> Cacheability:
    """Decide cacheability. Live-data requests always bypass; other non-reproducible ones
    bypass unless the tenant opted in."""
    live = live_data(request)
    if live is not None:
        return Cacheability(cacheable=False,
                            reason=f"live data: {live} makes the answer depend on when it is "
                                   "asked")
    f = request.keyed
    t = f.get("temperature", 1)
    # NOTE: exact types: a boolean temperature is not a number (and False == 0 in Python).
    if type(t) in (int, float):
        seed = f.get("seed")
        if seed is not None:
            return _seeded(seed)
        # A negative temperature (only a generic request can send one) samples nothing either.
        if t <= 0 and f.get("n", 1) == 1 and f.get("best_of", 1) == 1:
            return _GREEDY
    reason = _nondeterminism(f, t)
    if allow_nondeterministic:
        return Cacheability(cacheable=True, reason=f"opted in: {reason}")
    return Cacheability(cacheable=False, reason=reason)


@functools.lru_cache(maxsize=1024)
def _seeded(seed: int) -> Cacheability:
    # Agents send the same few seeds again and again; the verdict is a value, built once.
    return Cacheability(cacheable=True, reason=f"seeded: seed={seed}", reproducible=True)


def _nondeterminism(f: dict[str, Any], temperature: Any) -> str:
    """Why a request that :func:`assess` found neither seeded nor greedy is not reproducible."""
    if type(temperature) not in (int, float):
        return "nondeterministic: temperature is not a number"
    if temperature > 0:
        return f"nondeterministic: temperature={temperature} > 0 and no seed"
    n = f.get("n", 1)
    if n != 1:
        return f"nondeterministic: n={n} > 1 and no seed"
    # Here best_of is present: absent, it is 1 and the request was greedy.
    return f"nondeterministic: best_of={f['best_of']} > 1 and no seed"
