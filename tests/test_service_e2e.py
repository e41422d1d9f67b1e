"""End to end: the official ``openai`` client against the service running under uvicorn on
loopback, with real Redis (standalone and cluster) and an HTTP upstream."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest

from cachesvc.app import create_app
from tests.service_helpers import ADMIN, KEY_A, KEY_B, fake_openai_app, make_settings, serving
from tests.support.echo_upstream import EchoUpstream

pytestmark = pytest.mark.redis

MESSAGES = [{"role": "user", "content": "Name a prime."}]


@pytest.fixture
def echo() -> EchoUpstream:
    return EchoUpstream()


@pytest.fixture
def upstream_server(echo: EchoUpstream) -> Any:
    with serving(fake_openai_app(echo)) as server:
        yield server


@pytest.fixture(params=["standalone", "cluster"])
def service(request: Any, tmp_path: Any, upstream_server: Any) -> Any:
    if request.param == "standalone":
        redis_url = request.getfixturevalue("redis_url")
    else:
        redis_url = request.getfixturevalue("redis_cluster_url")
    settings = make_settings(tmp_path, redis={"url": redis_url},
                             upstream={"url": upstream_server.url + "/v1"})
    with serving(create_app(settings)) as server:
        yield server


def client(server: Any, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def chat_raw(c: openai.OpenAI, **kw: Any) -> Any:
    kw.setdefault("model", "echo-1")
    kw.setdefault("messages", MESSAGES)
    kw.setdefault("temperature", 0)
    return c.chat.completions.with_raw_response.create(**kw)


class TestOpenAIClient:
    def test_chat_repeat_hits_with_the_identical_body(self, service, echo):
        c = client(service)
        first, second = chat_raw(c), chat_raw(c)
        assert first.headers["x-cache"] == "MISS"
        assert second.headers["x-cache"] == "HIT" and "age" in second.headers
        assert second.http_response.content == first.http_response.content
        assert second.parse().choices[0].message.content.startswith("echo ")
        assert echo.calls == 1

    def test_a_changed_parameter_misses(self, service):
        c = client(service)
        chat_raw(c)
        assert chat_raw(c, max_tokens=9).headers["x-cache"] == "MISS"
        assert chat_raw(c, seed=4).headers["x-cache"] == "MISS"

    def test_another_tenant_misses(self, service):
        chat_raw(client(service, KEY_A))
        assert chat_raw(client(service, KEY_B)).headers["x-cache"] == "MISS"

    def test_a_rollout_turns_the_next_request_into_a_miss(self, service):
        c = client(service)
        chat_raw(c)
        r = httpx.post(service.url + "/admin/models/echo-1/rollout",
                       json={"version": "2", "create": True},
                       headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 200
        assert chat_raw(c).headers["x-cache"] == "MISS"
        assert chat_raw(c).headers["x-cache"] == "HIT"

    def test_completions_miss_then_hit(self, service):
        c = client(service)
        a = c.completions.with_raw_response.create(model="echo-1", prompt="2+2=", temperature=0)
        b = c.completions.with_raw_response.create(model="echo-1", prompt="2+2=", temperature=0)
        assert (a.headers["x-cache"], b.headers["x-cache"]) == ("MISS", "HIT")
        assert a.parse().choices[0].text == b.parse().choices[0].text

    def test_streaming_replays_every_chunk(self, service, echo):
        c = client(service)
        tools = [{"type": "function", "function": {"name": "calc", "parameters": {}}}]

        def run() -> tuple[str, list[Any]]:
            with c.chat.completions.with_streaming_response.create(
                model="echo-1", messages=MESSAGES, temperature=0, stream=True, tools=tools,
            ) as resp:
                return resp.headers["x-cache"], [ch.model_dump() for ch in resp.parse()]

        miss_state, miss = run()
        hit_state, hit = run()
        assert (miss_state, hit_state) == ("MISS", "HIT")
        assert hit == miss and len(hit) > 5
        reasoning = "".join((ch["choices"][0]["delta"].get("reasoning_content") or "")
                            for ch in hit if ch["choices"])
        assert reasoning.startswith("thinking about")
        args = "".join(tc["function"]["arguments"] or "" for ch in hit if ch["choices"]
                       for tc in (ch["choices"][0]["delta"].get("tool_calls") or []))
        assert args.startswith('{"q": ')
        assert echo.calls == 1

    def test_streaming_completions_hit(self, service):
        c = client(service)
        states, texts = [], []
        for _ in range(2):
            with c.completions.with_streaming_response.create(
                    model="echo-1", prompt="abc", temperature=0, stream=True) as resp:
                states.append(resp.headers["x-cache"])
                texts.append("".join(ch.choices[0].text for ch in resp.parse() if ch.choices))
        assert states == ["MISS", "HIT"]
        assert texts[0] == texts[1] and texts[0].startswith("echo")

    def test_upstream_errors_pass_through(self, service):
        with pytest.raises(openai.RateLimitError):
            chat_raw(client(service), metadata={"fail": "429"})


class TestSingleFlight:
    def test_concurrent_identical_misses_make_one_upstream_call(self, tmp_path, redis_url):
        slow = EchoUpstream(delay_s=0.3)
        settings = make_settings(tmp_path, redis={"url": redis_url})
        with serving(create_app(settings, upstream=slow)) as server:
            async def burst() -> list[httpx.Response]:
                async with httpx.AsyncClient(base_url=server.url, timeout=10) as h:
                    body = {"model": "echo-1", "messages": MESSAGES, "temperature": 0}
                    return await asyncio.gather(*[
                        h.post("/v1/chat/completions", json=body,
                               headers={"Authorization": f"Bearer {KEY_A}"})
                        for _ in range(12)])

            replies = asyncio.run(burst())
        assert slow.calls == 1
        assert len({r.content for r in replies}) == 1
        states = sorted(r.headers["x-cache"] for r in replies)
        assert states.count("MISS") == 12 - states.count("HIT")
        assert sum(r.headers.get("x-cache-coalesced") == "1" for r in replies) >= 1


class TestHttpUpstream:
    def test_a_stream_that_ends_without_done_is_not_stored(self, tmp_path, echo,
                                                           upstream_server):
        settings = make_settings(tmp_path, upstream={"url": upstream_server.url + "/v1"})
        with serving(create_app(settings)) as server:
            c = client(server)
            for _ in range(2):
                with pytest.raises(Exception):  # noqa: B017 - the client sees the cut stream
                    for _ in c.chat.completions.create(model="echo-1", messages=MESSAGES,
                                                       temperature=0, stream=True,
                                                       metadata={"fail": "cut"}):
                        pass
        assert echo.calls == 2

    def test_an_unreachable_upstream_is_a_502_not_a_500(self, tmp_path):
        settings = make_settings(tmp_path, upstream={"url": "http://127.0.0.1:9/v1",
                                                     "timeout_s": 2})
        with serving(create_app(settings)) as server:
            r = httpx.post(server.url + "/v1/chat/completions",
                           json={"model": "m", "messages": MESSAGES, "temperature": 0},
                           headers={"Authorization": f"Bearer {KEY_A}"})
        assert r.status_code == 502 and r.headers["x-cache"] == "MISS"
