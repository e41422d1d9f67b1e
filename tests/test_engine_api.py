"""The engine's OpenAI surface: in-process translation (``cachesvc.engine_api``) and the HTTP
app (``cachesvc.engine_app``), including through the official openai client."""

from __future__ import annotations

import asyncio
import re

import httpx
import orjson
import pytest

from cachesvc import engine_api
from cachesvc.engine_app import create_engine_app
from gpu_prefix.engine import Engine

LONG = "You are a careful assistant. Answer briefly and precisely, citing nothing. " * 2


def chat(content: str = "hello", **kw) -> dict:
    return {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 8,
            **kw}


class TestComplete:
    async def test_a_chat_completion_has_the_openai_shape_and_reports_cached_tokens(
        self, tiny_engine: Engine):
        first = await engine_api.complete(tiny_engine, chat(LONG), "chat", tenant="t")
        assert first["object"] == "chat.completion" and first["model"] == "random-tiny"
        msg = first["choices"][0]
        assert msg["message"]["role"] == "assistant" and msg["finish_reason"] in ("stop", "length")
        assert first["usage"]["completion_tokens"] == 8
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        again = await engine_api.complete(tiny_engine, chat(LONG), "chat", tenant="t")
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert again["choices"][0]["message"]["content"] == msg["message"]["content"]

    async def test_tenants_do_not_see_each_others_prefixes(self, tiny_engine: Engine):
        await engine_api.complete(tiny_engine, chat(LONG), "chat", tenant="a")
        other = await engine_api.complete(tiny_engine, chat(LONG), "chat", tenant="b")
        assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0

    async def test_a_text_completion_with_logprobs(self, tiny_engine: Engine):
        out = await engine_api.complete(tiny_engine,
                                        {"prompt": "abc", "max_tokens": 4, "temperature": 0,
                                                      "logprobs": 2}, "completion", tenant="t")
        c = out["choices"][0]
        assert out["object"] == "text_completion" and len(c["logprobs"]["token_logprobs"]) == 4
        assert "".join(c["logprobs"]["tokens"]) == c["text"]
        assert all(len(t) <= 2 for t in c["logprobs"]["top_logprobs"])

    async def test_chat_logprobs_carry_tokens_bytes_and_top_alternatives(self, tiny_engine: Engine):
        out = await engine_api.complete(tiny_engine, chat(logprobs=True, top_logprobs=2), "chat",
                                        tenant="t")
        items = out["choices"][0]["logprobs"]["content"]
        assert len(items) == 8 and all(len(i["top_logprobs"]) == 2 and i["bytes"] for i in items)

    async def test_a_seed_makes_sampling_reproducible(self, tiny_engine: Engine):
        body = {"prompt": "abc", "max_tokens": 12, "temperature": 1.2, "seed": 42}
        a = await engine_api.complete(tiny_engine, dict(body), "completion", tenant="t")
        b = await engine_api.complete(tiny_engine, dict(body), "completion", tenant="t")
        assert a["choices"][0]["text"] == b["choices"][0]["text"]

    async def test_max_completion_tokens_and_stop_are_honoured(self, tiny_engine: Engine):
        full = await engine_api.complete(tiny_engine,
                                         chat(max_tokens=None, max_completion_tokens=12), "chat",
                                         tenant="t")
        text = full["choices"][0]["message"]["content"]
        assert full["usage"]["completion_tokens"] == 12
        cut = await engine_api.complete(tiny_engine, chat(max_tokens=12, stop=[text[4:6]]), "chat",
                                        tenant="t")
        assert cut["choices"][0]["message"]["content"] == text[: text.find(text[4:6])]
        assert cut["choices"][0]["finish_reason"] == "stop"

    @pytest.mark.parametrize(
        ("patch", "status", "field"),
        [
            ({"n": 2}, 422, "n"),
            ({"tools": [{"type": "function"}]}, 422, "tools"),
            ({"presence_penalty": 0.5}, 422, "presence_penalty"),
            ({"temperature": 5}, 400, "temperature"),
            ({"max_tokens": 0}, 400, "max_tokens"),
            ({"max_tokens": 10**7}, 400, "max_tokens"),
            ({"stop": [1]}, 400, "stop"),
            ({"model": "gpt-4o"}, 404, "model"),
            ({"mystery": 1}, 400, "mystery"),
            ({"messages": []}, 400, "messages"),
            ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
            ({"top_logprobs": 2}, 400, "top_logprobs"),
            ({"stream": "yes"}, 400, "stream"),
            ({"stream_options": [1]}, 400, "stream_options"),
        ],
    )
    async def test_bad_or_unsupported_input_is_refused_naming_the_field(self, tiny_engine, patch,
                                                                        status, field):
        with pytest.raises(engine_api.EngineRequestError, match=re.escape(field)) as info:
            await engine_api.complete(tiny_engine, chat(**patch), "chat", tenant="t")
        assert info.value.status == status and info.value.field == field

    async def test_fields_that_cannot_change_the_output_are_accepted(self, tiny_engine: Engine):
        out = await engine_api.complete(tiny_engine, chat(user="u1", metadata={"a": "b"}, tools=[],
                                                          presence_penalty=0), "chat", tenant="t")
        assert out["choices"]


class TestStream:
    async def test_stream_chunks_join_to_the_non_streamed_answer(self, tiny_engine: Engine):
        body = chat(LONG, max_tokens=10, stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in engine_api.stream(tiny_engine, body, "chat", tenant="t")]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finals[-1] == "length" and all(f is None for f in finals[:-1])
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10
        whole = await engine_api.complete(tiny_engine, chat(LONG, max_tokens=10), "chat",
                                          tenant="t")
        assert text == whole["choices"][0]["message"]["content"]

    async def test_a_consumer_that_stops_early_releases_the_request(self, tiny_engine: Engine):
        agen = engine_api.stream(tiny_engine, chat(LONG, max_tokens=200, stream=True), "chat",
                                 tenant="t")
        await agen.__anext__()
        await agen.__anext__()
        await agen.aclose()
        for _ in range(200):
            if tiny_engine.stats().running == 0:
                break
            await asyncio.sleep(0.01)
        assert tiny_engine.stats().running == 0 and tiny_engine.stats().pinned_blocks == 0
        tiny_engine.store.check_valid()

    async def test_a_bad_stream_request_fails_before_the_first_chunk(self, tiny_engine: Engine):
        with pytest.raises(engine_api.EngineRequestError, match="temperature"):
            await engine_api.stream(tiny_engine, chat(stream=True, temperature=-1), "chat",
                                    tenant="t").__anext__()


def client_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://engine")


class TestApp:
    async def test_bearer_keys_map_to_tenants_and_unknown_keys_are_refused(
        self, tiny_engine: Engine):
        app = create_engine_app(tiny_engine, api_keys={"ka": "a", "kb": "b", "ka2": "a"})
        async with client_for(app) as c:
            r = await c.post("/v1/chat/completions", json=chat(LONG))
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            r = await c.post("/v1/chat/completions", json=chat(LONG),
                             headers={"Authorization": "Bearer nope"})
            assert r.status_code == 401
            await c.post("/v1/chat/completions", json=chat(LONG),
                         headers={"Authorization": "Bearer ka"})
            same = await c.post("/v1/chat/completions", json=chat(LONG),
                                headers={"Authorization": "Bearer ka2"})
            other = await c.post("/v1/chat/completions", json=chat(LONG),
                                 headers={"Authorization": "Bearer kb"})
        assert same.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert other.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0

    async def test_isolation_can_be_switched_off_for_the_timing_audit(self, make_engine):
        app = create_engine_app(make_engine(isolate_tenants=False), api_keys={"ka": "a", "kb": "b"})
        async with client_for(app) as c:
            await c.post("/v1/chat/completions", json=chat(LONG),
                         headers={"Authorization": "Bearer ka"})
            other = await c.post("/v1/chat/completions", json=chat(LONG),
                                 headers={"Authorization": "Bearer kb"})
        assert other.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0

    async def test_sse_streams_chunks_then_done(self, tiny_engine: Engine):
        app = create_engine_app(tiny_engine)
        async with client_for(app) as c:
            r = await c.post("/v1/completions",
                             json={"prompt": "abc", "max_tokens": 5, "temperature": 0,
                                                      "stream": True})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.text.split("\n\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [orjson.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    async def test_errors_are_openai_shaped_with_the_status_and_field(self, tiny_engine: Engine):
        app = create_engine_app(tiny_engine)
        async with client_for(app) as c:
            r = await c.post("/v1/chat/completions", json=chat(n=3, stream=True))
            assert r.status_code == 422 and r.json()["error"]["param"] == "n"
            r = await c.post("/v1/chat/completions", content=b"{nope")
            assert r.status_code == 400 and r.json()["error"]["param"] == "body"

    async def test_an_overloaded_engine_answers_503_with_retry_after(self, make_engine):
        engine = make_engine(max_running=1, max_queue=0)
        with engine.scheduler.paused():
            busy = asyncio.ensure_future(engine_api.complete(engine, chat(), "chat", tenant="t"))
            while engine.stats().running == 0:  # noqa: ASYNC110 - the engine has no event for it
                await asyncio.sleep(0.005)
            async with client_for(create_engine_app(engine)) as c:
                r = await c.post("/v1/chat/completions", json=chat())
                s = await c.post("/v1/chat/completions", json=chat(stream=True))
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert s.status_code == 503
        assert (await busy)["choices"][0]["finish_reason"] in ("stop", "length")

    async def test_models_health_and_metrics(self, tiny_engine: Engine):
        app = create_engine_app(tiny_engine)
        async with client_for(app) as c:
            await c.post("/v1/chat/completions", json=chat(LONG))
            await c.post("/v1/chat/completions", json=chat(LONG))
            models = (await c.get("/v1/models")).json()
            health = (await c.get("/healthz")).json()
            metrics = (await c.get("/metrics")).text
        assert models["data"][0]["id"] == "random-tiny"
        assert health["status"] == "ok" and health["model_epoch"] == 1
        hit = next(
            line for line in metrics.splitlines() if line.startswith(
                "engine_prefix_hit_tokens_total"))
        assert float(hit.split()[-1]) > 0
        assert "engine_kv_pool_usage_ratio" in metrics
        assert "engine_requests_refused_total" in metrics
        steps = next(line for line in metrics.splitlines() if line.startswith("engine_steps_total"))
        ttft = next(
            line for line in metrics.splitlines() if line.startswith("engine_ttft_seconds_count"))
        assert float(steps.split()[-1]) > 0 and float(ttft.split()[-1]) == 2
        cached = next(
            line for line in metrics.splitlines() if line.startswith(
                'engine_kv_blocks{state="cached"}'))
        assert float(cached.split()[-1]) > 0

    async def test_the_openai_client_works_against_it(self, tiny_engine: Engine):
        import openai

        app = create_engine_app(tiny_engine, api_keys={"sk-test": "a"})
        http = client_for(app)
        client = openai.AsyncOpenAI(api_key="sk-test", base_url="http://engine/v1",
                                    http_client=http)
        r = await client.chat.completions.create(model="random-tiny",
                                                 messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, temperature=0)
        assert r.usage.completion_tokens == 5
        parts = []
        stream = await client.chat.completions.create(model="random-tiny",
                                                      messages=[{"role": "user", "content": "hi"}],
                                                      max_tokens=5, temperature=0, stream=True,
                                                      stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        assert "".join(parts) == r.choices[0].message.content
        await http.aclose()


class TestConcurrency:
    async def test_a_burst_reaches_admission_control_and_the_excess_is_refused_retryably(
        self, make_engine):
        engine = make_engine(max_running=2, max_queue=2, queue_timeout_s=30)
        body = chat(LONG, max_tokens=30)
        results = await asyncio.gather(
            *(engine_api.complete(engine, dict(body), "chat", tenant="t") for _ in range(10)),
            return_exceptions=True,
        )
        refused = [r for r in results if isinstance(r, engine_api.EngineOverloadedError)]
        served = [r for r in results if isinstance(r, dict)]
        assert len(refused) + len(served) == 10 and refused and len(served) >= 4
        assert len({r["choices"][0]["message"]["content"] for r in served}) == 1
        assert engine.stats().refused_total == len(refused)
        engine.store.check_valid()
