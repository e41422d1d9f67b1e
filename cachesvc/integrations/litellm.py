"""LiteLLM's response cache, answered by this service.

    import litellm
    from cachesvc.integrations.litellm import ProvableCache

    litellm.cache = ProvableCache("http://cache:8080", api_key="sk-...")

From then on ``litellm.completion`` and ``litellm.acompletion`` (and a LiteLLM proxy configured
with ``callbacks: ["cachesvc.integrations.litellm.proxy_cache"]``, see docs/gateway.md) look
each request up in this service and fill it on a miss. LiteLLM's own cache key is not used: the
request goes to the service as LiteLLM received it, and the service keys it (every parameter
that can change the answer, provider options included), scopes it by the tenant of ``api_key``,
and ties it to the model's current epoch. A hit is handed back through LiteLLM's own cache path,
so callers see exactly what a LiteLLM cache hit gives them (``ModelResponse`` or a replayed
stream, ``_hidden_params["cache_hit"]``, the cache-hit logging callbacks). A streamed answer is
stored once LiteLLM has assembled it, i.e. only when the stream completed. The cache failing is a
miss: LiteLLM answers from the model (``cachesvc.client`` fails open).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

try:
    import litellm
    from litellm.caching.caching import Cache, CacheMode
    from litellm.integrations.custom_logger import CustomLogger
except ImportError as exc:  # pragma: no cover - the module is only imported with LiteLLM
    raise ImportError("cachesvc.integrations.litellm needs LiteLLM: "
                      "pip install 'provable-llm-cache[litellm]'") from exc
import orjson
from pydantic import BaseModel

from cachesvc.client import DEFAULT_TIMEOUT_S, AsyncCacheClient, CacheClient, Lookup

__all__ = ["ProvableCache", "install"]

log = logging.getLogger("cachesvc.integrations.litellm")

#: LiteLLM's own keyword arguments that cannot change the model's answer: credentials and
#: endpoints, retries and timeouts, routing, budgets and rate limits, logging, cache controls.
#: Every other argument, LiteLLM's or the provider's, goes to the key builder: an argument not
#: listed here costs misses, never a wrong hit (fail closed).
INERT_KWARGS: frozenset[str] = frozenset({
    "api_key", "api_base", "base_url", "client_id", "client_secret", "litellm_credential_name",
    "ssl_verify", "region_name", "data_residency",
    "litellm_call_id", "litellm_logging_obj", "litellm_trace_id", "litellm_session_id",
    "litellm_metadata", "metadata", "model_info", "proxy_server_request", "parent_otel_span",
    "completion_call_id", "id", "tags", "secret_fields", "stream_response",
    "preset_cache_key", "cache_key", "cache", "caching",
    "acompletion", "atext_completion", "text_completion", "aembedding", "aimg_generation",
    "async_call", "client", "shared_session", "use_client", "logger_fn", "verbose", "no-log",
    "turn_off_message_logging", "litellm_disabled_callbacks", "litellm_request_debug",
    "litellm_trusted_callback_vars",
    "timeout", "request_timeout", "stream_timeout", "force_timeout", "client_side_timeout",
    "num_retries", "max_retries", "retry_policy", "retry_strategy", "cooldown_time",
    "fallbacks", "max_fallbacks", "fallback_depth", "model_list", "attempted_targets",
    "routing_strategy", "order", "weight", "rpm", "tpm", "rpd", "tpd", "itpm", "otpm",
    "max_parallel_requests", "max_budget", "budget_duration", "daily_reset_time",
    "keepalive_seconds", "allow_client_keepalive_override",
})
#: Names of whole families of inert arguments: LiteLLM's private state (``_...``), observability
#: integrations' settings, and pricing.
INERT_PREFIXES: tuple[str, ...] = (
    "_", "langfuse_", "langsmith_", "arize_", "dd_", "posthog_", "newrelic_", "wandb_",
    "weave_", "signoz_", "humanloop_", "s3_", "gcs_", "azure_", "aws_")
INERT_INFIXES: tuple[str, ...] = ("cost_per", "_cost", "uplift")

#: LiteLLM call types this cache answers: chat completions (``completion``, ``acompletion``).
CALL_TYPES = ["completion", "acompletion"]


def openai_request(kwargs: Mapping[str, Any], inert: frozenset[str] = INERT_KWARGS
                   ) -> dict[str, Any]:
    """The request LiteLLM received, as the OpenAI body the service keys: every argument but
    the inert ones; ``None`` (LiteLLM's "not given") left out."""
    return {k: v for k, v in kwargs.items()
            if v is not None and k not in inert and not k.startswith(INERT_PREFIXES)
            and not any(i in k for i in INERT_INFIXES)}


def _json(value: Any) -> Any:
    if isinstance(value, BaseModel):  # messages LiteLLM returned, sent back in a conversation
        return value.model_dump(exclude_none=True)
    if isinstance(value, type) and issubclass(value, BaseModel):  # response_format=MyModel
        return {"pydantic_model": value.__name__, "schema": value.model_json_schema()}
    raise TypeError(f"{type(value).__name__} is not JSON")


class _Pending:
    """Lookups waiting for their fill, by a digest of the request sent (LiteLLM looks up and
    fills with the same arguments, on the same or another thread). Bounded: a lookup whose call
    failed is never filled, and the oldest is dropped first."""

    def __init__(self, limit: int = 4096) -> None:
        self._items: OrderedDict[bytes, Lookup] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def put(self, digest: bytes, found: Lookup) -> None:
        with self._lock:
            self._items[digest] = found
            if len(self._items) > self._limit:
                self._items.popitem(last=False)

    def pop(self, digest: bytes) -> Lookup | None:
        with self._lock:
            return self._items.pop(digest, None)


class ProvableCache(Cache):
    """``litellm.cache`` for this service. ``api_key`` is a tenant key of the service (its scope
    is the scope of every entry); ``timeout_s`` bounds each call; ``fail_open=False`` lets cache
    errors reach LiteLLM (which then logs them and calls the model anyway); ``ttl`` (seconds,
    at most the tenant's) applies to every fill unless a request's ``cache={"ttl": N}`` says
    otherwise; ``inert_kwargs`` adds argument names that must not be keyed."""

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 fail_open: bool = True, ttl: int | None = None,
                 mode: CacheMode = CacheMode.default_on,
                 inert_kwargs: frozenset[str] = frozenset()) -> None:
        # NOTE: LiteLLM's max_messages (skip requests with more than 4 messages) protects its
        # weak key; this cache keys every message, so it is off.
        super().__init__(type="local", mode=mode, supported_call_types=list(CALL_TYPES),
                         max_messages=None)
        self.ttl = ttl
        self._base_url, self._api_key = base_url, api_key
        self._options: dict[str, Any] = {"timeout_s": timeout_s, "fail_open": fail_open}
        self._inert = INERT_KWARGS | inert_kwargs
        self._sync = CacheClient(base_url, api_key, **self._options)
        # One async client per event loop: its pooled connections belong to that loop.
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncCacheClient] = \
            weakref.WeakKeyDictionary()
        self._pending = _Pending()

    def _aclient(self) -> AsyncCacheClient:
        loop = asyncio.get_running_loop()
        client = self._async.get(loop)
        if client is None:
            client = self._async[loop] = AsyncCacheClient(self._base_url, self._api_key,
                                                          **self._options)
        return client

    def _request(self, kwargs: Mapping[str, Any]) -> tuple[orjson.Fragment, bytes]:
        """The request for the service, encoded once, and a digest naming it among pending
        fills. Keys are sorted so that the lookup's and the fill's arguments, which LiteLLM
        passes in different orders, name the same request (the key builder folds key order)."""
        raw = orjson.dumps(openai_request(kwargs, self._inert), default=_json,
                           option=orjson.OPT_SORT_KEYS)
        return orjson.Fragment(raw), hashlib.blake2b(raw, digest_size=16).digest()

    @staticmethod
    def _cache_control(kwargs: Mapping[str, Any]) -> str | None:
        max_age = (kwargs.get("cache") or {}).get("s-maxage")
        return None if max_age is None else f"max-age={int(max_age)}"

    def _ttl(self, kwargs: Mapping[str, Any]) -> int | None:
        ttl = (kwargs.get("cache") or {}).get("ttl", self.ttl)
        return None if ttl is None else int(ttl)

    @staticmethod
    def _answer(result: Any) -> dict[str, Any]:
        if isinstance(result, BaseModel):
            return orjson.loads(result.model_dump_json(exclude_unset=True))
        if isinstance(result, str | bytes):
            return orjson.loads(result)
        return dict(result)

    def get_cache_key(self, **kwargs: Any) -> str:
        """Only a label for LiteLLM's logs and ``_hidden_params``: the service builds the key.
        Never raises (LiteLLM calls it outside its own guard); a request that cannot be sent is
        not cached (its lookup and fill fail, as misses)."""
        try:
            return "cachesvc:" + self._request(kwargs)[1].hex()
        except TypeError:
            return "cachesvc:unsendable"

    def _found(self, digest: bytes, found: Lookup) -> dict[str, Any] | None:
        if found.hit:
            return found.response
        self._pending.put(digest, found)  # a bypass or an error too: its fill stores nothing
        return None

    def get_cache(self, dynamic_cache_object: Any = None, **kwargs: Any) -> Any:
        try:
            if not self.should_use_cache(**kwargs):
                return None
            body, digest = self._request(kwargs)
            return self._found(digest, self._sync.lookup(
                body, kind="chat", cache_control=self._cache_control(kwargs)))
        except Exception as exc:  # noqa: BLE001 - the cache never fails LiteLLM's call
            return self._failed("lookup", exc)

    async def async_get_cache(self, dynamic_cache_object: Any = None, **kwargs: Any) -> Any:
        try:
            if not self.should_use_cache(**kwargs):
                return None
            body, digest = self._request(kwargs)
            return self._found(digest, await self._aclient().lookup(
                body, kind="chat", cache_control=self._cache_control(kwargs)))
        except Exception as exc:  # noqa: BLE001
            return self._failed("lookup", exc)

    def add_cache(self, result: Any, **kwargs: Any) -> None:
        try:
            if not self.should_use_cache(**kwargs):
                return
            body, digest = self._request(kwargs)
            found = self._pending.pop(digest) or self._sync.lookup(
                body, kind="chat", cache_control="no-cache")
            self._sync.store(found, response=self._answer(result), request=body,
                             ttl_seconds=self._ttl(kwargs))
        except Exception as exc:  # noqa: BLE001
            self._failed("store", exc)

    async def async_add_cache(self, result: Any, dynamic_cache_object: Any = None,
                              **kwargs: Any) -> None:
        try:
            if not self.should_use_cache(**kwargs):
                return
            body, digest = self._request(kwargs)
            client = self._aclient()
            found = self._pending.pop(digest) or await client.lookup(
                body, kind="chat", cache_control="no-cache")
            await client.store(found, response=self._answer(result), request=body,
                               ttl_seconds=self._ttl(kwargs))
        except Exception as exc:  # noqa: BLE001
            self._failed("store", exc)

    def _failed(self, what: str, exc: Exception) -> None:
        if not self._options["fail_open"]:
            raise exc
        log.warning("cachesvc %s failed: %s: %s", what, type(exc).__name__, exc)

    async def disconnect(self) -> None:
        self._sync.close()
        for client in list(self._async.values()):
            await client.aclose()


def install(base_url: str, api_key: str, **options: Any) -> ProvableCache:
    """Make this service LiteLLM's cache (``litellm.cache``); ``options`` as ``ProvableCache``."""
    litellm.cache = ProvableCache(base_url, api_key, **options)
    return litellm.cache


class _ProxyInstaller(CustomLogger):
    """What the proxy's ``callbacks`` entry resolves to: the cache is installed when the proxy
    loads it; the callback itself does nothing."""


def __getattr__(name: str) -> Any:
    # NOTE: the proxy resolves `cachesvc.integrations.litellm.proxy_cache` with getattr once at
    # start-up; installing here (not at import) keeps importing this module free of effects.
    if name != "proxy_cache":
        raise AttributeError(name)
    url, key = os.environ.get("CACHESVC_URL"), os.environ.get("CACHESVC_API_KEY")
    if not url or not key:
        raise RuntimeError("set CACHESVC_URL and CACHESVC_API_KEY for the LiteLLM proxy's "
                           "cachesvc.integrations.litellm.proxy_cache callback")
    timeout = float(os.environ.get("CACHESVC_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    install(url, key, timeout_s=timeout)
    return _ProxyInstaller()
