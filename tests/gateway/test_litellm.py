"""End to end: the real LiteLLM library with ``ProvableCache`` as its cache, this service and an
echo model over HTTP on loopback.

Runs in a virtualenv with LiteLLM (``make test`` uses ``.venv-bench``; LiteLLM's pins must not
move the service's dependencies); the service and the model run in the service's own
virtualenv (``tests/gateway/stack.py``). Skipped where LiteLLM is not installed.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network: the bundled map
litellm = pytest.importorskip("litellm")
from litellm.caching.caching import Cache  # noqa: E402
from litellm.integrations.custom_logger import CustomLogger  # noqa: E402

from cachesvc.client import CacheClient  # noqa: E402
from cachesvc.integrations.litellm import ProvableCache, openai_request  # noqa: E402
from tests.gateway.harness import Stack  # noqa: E402

MODEL = "openai/echo-1"


@pytest.fixture
def cache(stack: Stack) -> Iterator[ProvableCache]:
    litellm.cache = ProvableCache(stack.service, stack.key_a, timeout_s=5)
    yield litellm.cache
    litellm.cache = None


def request(stack: Stack, text: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "temperature": 0,
            "api_base": stack.upstream, "api_key": "sk-upstream", **extra}


def wait_stored(stack: Stack, req: dict[str, Any]) -> None:
    """LiteLLM fills after answering (a background task for async calls): wait for the entry."""
    with CacheClient(stack.service, stack.key_a) as c:
        deadline = time.monotonic() + 10
        while not c.lookup(openai_request(req)).hit:
            assert time.monotonic() < deadline, "the fill never reached the service"
            time.sleep(0.02)


def hit(response: Any) -> bool:
    return bool(response._hidden_params.get("cache_hit"))


def text_of(response: Any) -> str:
    return response.choices[0].message.content


def streamed(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


class TestMissThenHit:
    def test_a_repeat_is_a_hit_that_does_not_call_the_model(self, stack, cache):
        req = request(stack, "miss then hit")
        calls = stack.model_calls()
        first = litellm.completion(**req)
        wait_stored(stack, req)
        second = litellm.completion(**req)
        assert not hit(first) and hit(second)
        assert text_of(second) == text_of(first) and text_of(first).startswith("echo ")
        assert stack.model_calls() == calls + 1

    async def test_acompletion_hits_too(self, stack, cache):
        req = request(stack, "async miss then hit")
        first = await litellm.acompletion(**req)
        await asyncio.to_thread(wait_stored, stack, req)
        second = await litellm.acompletion(**req)
        assert not hit(first) and hit(second) and text_of(second) == text_of(first)

    def test_a_hit_reaches_the_caller_as_litellms_own_cache_hit_does(self, stack):
        class Seen(CustomLogger):
            def __init__(self) -> None:
                super().__init__()
                self.flags: list[Any] = []

            def log_success_event(self, kwargs, response_obj, start_time, end_time):
                self.flags.append((kwargs.get("litellm_call_id"), kwargs.get("cache_hit")))

        seen = Seen()
        litellm.callbacks = [seen]

        def hit_through(cache: Any) -> tuple[Any, Any]:
            """The second of two identical calls, and the cache-hit flag its callback saw."""
            litellm.cache = cache
            try:
                req = request(stack, "as litellm's own")
                litellm.completion(**req)
                if isinstance(cache, ProvableCache):
                    wait_stored(stack, req)
                out = litellm.completion(**req)
                call_id = out._hidden_params.get("litellm_call_id")
                deadline = time.monotonic() + 10  # success callbacks run on a thread
                while call_id not in dict(seen.flags) and time.monotonic() < deadline:
                    time.sleep(0.02)
                return out, dict(seen.flags).get(call_id)
            finally:
                litellm.cache = None

        try:
            ours, our_flag = hit_through(ProvableCache(stack.service, stack.key_a))
            own, own_flag = hit_through(Cache(type="local"))
        finally:
            litellm.callbacks = []
        assert type(ours) is type(own) is litellm.ModelResponse
        assert ours._hidden_params["cache_hit"] is own._hidden_params["cache_hit"] is True
        assert ours.model_dump() == own.model_dump()
        assert our_flag is own_flag is True


class TestPerRequestControls:
    def test_no_cache_asks_the_model_and_refreshes_the_entry(self, stack, cache):
        req = request(stack, "no-cache")
        litellm.completion(**req)
        wait_stored(stack, req)
        calls = stack.model_calls()
        fresh = litellm.completion(**req, cache={"no-cache": True})
        assert not hit(fresh) and stack.model_calls() == calls + 1
        assert hit(litellm.completion(**req))

    def test_no_store_leaves_nothing_behind(self, stack, cache):
        req = request(stack, "no-store")
        litellm.completion(**req, cache={"no-store": True})
        time.sleep(0.3)  # a fill, had there been one, lands well within this
        assert not hit(litellm.completion(**req))


class TestRequestsLiteLLMsKeyConfuses:
    def test_a_different_provider_option_is_a_miss_with_its_own_answer(self, stack, cache):
        # LiteLLM's own key leaves extra_body out: the second request would get the first's
        # answer from a LiteLLM cache.
        a = request(stack, "provider option", extra_body={"top_k": 1})
        b = request(stack, "provider option", extra_body={"top_k": 40})
        first = litellm.completion(**a)
        wait_stored(stack, a)
        second = litellm.completion(**b)
        assert not hit(second) and text_of(second) != text_of(first)
        wait_stored(stack, b)
        assert text_of(litellm.completion(**a)) == text_of(first)

    def test_a_different_seed_is_a_miss_and_a_sampled_seeded_request_hits(self, stack, cache):
        a = request(stack, "seeded", temperature=0.8, seed=1)
        first = litellm.completion(**a)
        wait_stored(stack, a)
        other = litellm.completion(**request(stack, "seeded", temperature=0.8, seed=2))
        again = litellm.completion(**a)
        assert not hit(other) and text_of(other) != text_of(first)
        assert hit(again) and text_of(again) == text_of(first)

    def test_the_same_request_with_its_keys_in_another_order_hits(self, stack, cache):
        schema = {"type": "json_schema",
                  "json_schema": {"name": "a", "schema": {"type": "object", "title": "t"}}}
        reordered = {"json_schema": {"schema": {"title": "t", "type": "object"}, "name": "a"},
                     "type": "json_schema"}
        a = request(stack, "key order", response_format=schema)
        first = litellm.completion(**a)
        wait_stored(stack, a)
        b = request(stack, "key order", response_format=reordered)
        b["messages"] = [{"content": "key order", "role": "user"}]
        second = litellm.completion(**b)
        assert hit(second) and text_of(second) == text_of(first)

    async def test_a_pydantic_response_format_is_keyed_by_its_schema(self, stack, cache):
        from pydantic import BaseModel

        class Order(BaseModel):
            id: int

        class Refund(BaseModel):
            amount: float

        first = await litellm.acompletion(**request(stack, "schema", response_format=Order))
        assert not hit(first)
        again = None
        for _ in range(200):  # the fill lands in the background
            again = await litellm.acompletion(**request(stack, "schema", response_format=Order))
            if hit(again):
                break
            await asyncio.sleep(0.05)
        assert hit(again) and text_of(again) == text_of(first)
        other = await litellm.acompletion(**request(stack, "schema", response_format=Refund))
        assert not hit(other) and text_of(other) != text_of(first)

    def test_a_request_sampled_without_a_seed_is_never_served_from_the_cache(
            self, stack, cache):
        req = request(stack, "sampled", temperature=0.9)
        calls = stack.model_calls()
        assert not hit(litellm.completion(**req)) and not hit(litellm.completion(**req))
        assert stack.model_calls() == calls + 2

    def test_another_tenant_does_not_see_the_entry(self, stack, cache):
        req = request(stack, "tenant")
        litellm.completion(**req)
        wait_stored(stack, req)
        litellm.cache = ProvableCache(stack.service, stack.key_b)
        assert not hit(litellm.completion(**req))


class TestStreaming:
    def test_a_completed_stream_is_stored_and_replayed_as_a_stream(self, stack, cache):
        req = request(stack, "stream", stream=True)
        calls = stack.model_calls()
        first = list(litellm.completion(**req))
        wait_stored(stack, req)
        replay = litellm.completion(**req)
        assert isinstance(replay, litellm.CustomStreamWrapper)
        second = list(replay)
        assert streamed(second) == streamed(first) and streamed(first).startswith("echo ")
        assert stack.model_calls() == calls + 1
        # the entry serves a plain request too (`stream` is not keyed)
        plain = litellm.completion(**{**req, "stream": False})
        assert hit(plain) and text_of(plain) == streamed(first)

    async def test_an_async_stream_is_stored_and_replayed(self, stack, cache):
        req = request(stack, "async stream", stream=True)
        first = [c async for c in await litellm.acompletion(**req)]
        await asyncio.to_thread(wait_stored, stack, req)
        calls = stack.model_calls()
        second = [c async for c in await litellm.acompletion(**req)]
        assert streamed(second) == streamed(first) and stack.model_calls() == calls


class TestFailures:
    def test_with_the_service_down_litellm_answers_from_the_model(self, stack):
        down = f"http://127.0.0.1:{_closed_port()}"
        litellm.cache = ProvableCache(down, stack.key_a)
        try:
            req = request(stack, "service down")
            calls = stack.model_calls()
            answers = [litellm.completion(**req) for _ in range(2)]
            assert all(text_of(a).startswith("echo ") and not hit(a) for a in answers)
            assert stack.model_calls() == calls + 2
        finally:
            litellm.cache = None

    def test_a_rollout_makes_the_next_call_a_miss(self, stack, cache):
        req = request(stack, "rollout")
        litellm.completion(**req)
        wait_stored(stack, req)
        assert hit(litellm.completion(**req))
        stack.rollout(MODEL, "2")
        calls = stack.model_calls()
        assert not hit(litellm.completion(**req))
        assert stack.model_calls() == calls + 1


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

