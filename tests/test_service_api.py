"""The service's HTTP behaviour, in process (FastAPI TestClient, the embedded store, the
deterministic upstream): headers, Cache-Control, tenants, limits, the cache API, admin."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

from cachesvc.app import create_app
from cachesvc.events import CacheEvent, EveryEvent
from cachesvc.store import EmbeddedStore, decode_entry
from keying import rebuild_key
from tests.service_helpers import ADMIN, KEY_A, KEY_A2, KEY_B, KEY_U, auth, chat, make_settings
from tests.store_helpers import KEYS
from tests.support.echo_upstream import EchoUpstream


class Recorder(EveryEvent):
    def __init__(self) -> None:
        self.events: list[CacheEvent] = []

    def observe(self, event: CacheEvent) -> None:
        self.events.append(event)


class Exploding(EveryEvent):
    def observe(self, event: CacheEvent) -> None:
        raise RuntimeError("observer bug")


@pytest.fixture
def upstream() -> EchoUpstream:
    return EchoUpstream()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def client(tmp_path: Any, upstream: EchoUpstream, recorder: Recorder) -> Any:
    app = create_app(make_settings(tmp_path, limits={"max_request_bytes": 20_000,
                                                     "max_entry_bytes": 50_000}),
                     upstream=upstream, observers=[Exploding(), recorder])
    with TestClient(app) as c:
        yield c


def post(client: TestClient, body: Any, key: str = KEY_A, path: str = "/v1/chat/completions",
         **headers: str) -> Any:
    return client.post(path, json=body, headers={**auth(key), **headers})


def sse_chunks(text: str) -> list[Any]:
    out = []
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(orjson.loads(line[6:]))
    return out


class TestProxyHits:
    def test_a_repeat_is_a_hit_with_the_identical_body_and_an_age(self, client, upstream):
        first = post(client, chat())
        second = post(client, chat())
        assert first.headers["x-cache"] == "MISS" and "age" not in first.headers
        assert second.headers["x-cache"] == "HIT" and second.headers["age"] == "0"
        assert second.content == first.content
        assert upstream.calls == 1

    def test_a_changed_parameter_is_a_miss(self, client, upstream):
        post(client, chat())
        r = post(client, chat(max_tokens=7))
        assert r.headers["x-cache"] == "MISS"
        assert r.json()["choices"][0]["message"]["content"] != post(
            client, chat()).json()["choices"][0]["message"]["content"]

    def test_another_tenant_sending_the_identical_request_misses(self, client, upstream):
        post(client, chat(), KEY_A)
        assert post(client, chat(), KEY_B).headers["x-cache"] == "MISS"
        assert upstream.calls == 2

    def test_two_keys_of_one_tenant_share_entries(self, client):
        post(client, chat(), KEY_A)
        assert post(client, chat(), KEY_A2).headers["x-cache"] == "HIT"

    def test_a_user_scoped_tenant_keys_per_user(self, client):
        post(client, chat(user="alice"), KEY_U)
        assert post(client, chat(user="alice"), KEY_U).headers["x-cache"] == "HIT"
        assert post(client, chat(user="bob"), KEY_U).headers["x-cache"] == "MISS"

    def test_a_user_scoped_tenant_without_a_user_is_told_to_send_one(self, client):
        r = post(client, chat(), KEY_U)
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "user"

    def test_nondeterministic_requests_bypass_with_the_reason(self, client, upstream):
        r = post(client, chat(temperature=0.7))
        r2 = post(client, chat(temperature=0.7))
        assert r.headers["x-cache"] == r2.headers["x-cache"] == "BYPASS"
        assert "temperature" in r.headers["x-cache-reason"]
        assert upstream.calls == 2

    def test_a_seeded_sampled_request_is_cached(self, client):
        post(client, chat(temperature=0.7, seed=3))
        assert post(client, chat(temperature=0.7, seed=3)).headers["x-cache"] == "HIT"

    def test_completions_hit_too(self, client):
        body = {"model": "echo-1", "prompt": "once upon", "temperature": 0}
        a = post(client, body, path="/v1/completions")
        b = post(client, body, path="/v1/completions")
        assert (a.headers["x-cache"], b.headers["x-cache"]) == ("MISS", "HIT")
        assert a.json() == b.json() and a.json()["object"] == "text_completion"


class TestCacheControl:
    def test_no_cache_skips_the_lookup_but_still_fills(self, client, upstream):
        post(client, chat())
        r = post(client, chat(), **{"Cache-Control": "no-cache"})
        assert r.headers["x-cache"] == "MISS" and upstream.calls == 2
        assert post(client, chat()).headers["x-cache"] == "HIT"

    def test_no_store_never_stores(self, client, upstream):
        post(client, chat(), **{"Cache-Control": "no-store"})
        assert post(client, chat()).headers["x-cache"] == "MISS"

    def test_max_age_refuses_older_hits(self, client, tmp_path):
        post(client, chat())
        services = client.app.state.services
        services.cache.clock = lambda: __import__("time").time() + 100
        r = post(client, chat(), **{"Cache-Control": "max-age=500"})
        assert r.headers["x-cache"] == "HIT" and int(r.headers["age"]) >= 100
        assert post(client, chat(), **{"Cache-Control": "max-age=50"}).headers["x-cache"] == "MISS"
        # that miss refilled the entry, so it is young again
        assert post(client, chat(), **{"Cache-Control": "max-age=50"}).headers["age"] == "0"

    def test_only_if_cached_is_a_504_on_a_miss_and_a_hit_otherwise(self, client, upstream):
        r = post(client, chat(), **{"Cache-Control": "only-if-cached"})
        assert r.status_code == 504 and upstream.calls == 0
        post(client, chat())
        assert post(client, chat(), **{"Cache-Control": "only-if-cached"}).status_code == 200

    def test_a_malformed_max_age_names_the_header(self, client):
        r = post(client, chat(), **{"Cache-Control": "max-age=soon"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "Cache-Control"


class TestStreaming:
    def test_a_stream_is_recorded_and_replayed_chunk_for_chunk(self, client, upstream):
        body = chat(stream=True, tools=[{"type": "function",
                                         "function": {"name": "lookup", "parameters": {}}}])
        miss = post(client, body)
        hit = post(client, body)
        assert miss.headers["x-cache"] == "MISS" and hit.headers["x-cache"] == "HIT"
        assert miss.headers["content-type"].startswith("text/event-stream")
        assert hit.text == miss.text and hit.text.endswith("data: [DONE]\n\n")
        chunks = sse_chunks(hit.text)
        assert len(chunks) > 5  # not one merged chunk
        deltas = [c["choices"][0]["delta"] for c in chunks]
        assert any("reasoning_content" in d for d in deltas)
        assert any("tool_calls" in d for d in deltas)
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"

    def test_a_non_stream_request_hitting_a_stream_gets_the_assembled_body(self, client):
        body = chat(seed=1, tools=[{"type": "function", "function": {"name": "f",
                                                                     "parameters": {}}}])
        streamed = post(client, {**body, "stream": True})
        direct = EchoUpstream()
        import asyncio

        expected = asyncio.run(direct.complete(body, "chat", tenant="x"))
        hit = post(client, body)
        assert hit.headers["x-cache"] == "HIT"
        got = hit.json()["choices"][0]
        want = expected["choices"][0]
        assert got["message"]["content"] == want["message"]["content"]
        assert got["message"]["tool_calls"] == want["message"]["tool_calls"]
        assert got["finish_reason"] == want["finish_reason"]
        assert got["message"]["reasoning_content"].split() == \
            want["message"]["reasoning_content"].split()
        assert streamed.status_code == 200

    def test_a_stream_request_hitting_a_body_gets_a_faithful_stream(self, client):
        body = chat(seed=2)
        plain = post(client, body).json()
        hit = post(client, {**body, "stream": True})
        assert hit.headers["x-cache"] == "HIT"
        chunks = sse_chunks(hit.text)
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert text == plain["choices"][0]["message"]["content"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

    def test_the_usage_chunk_is_replayed_only_when_asked_for(self, client):
        body = chat(stream=True, stream_options={"include_usage": True})
        post(client, body)
        with_usage = sse_chunks(post(client, body).text)
        without = sse_chunks(post(client, {**body, "stream_options": None}).text)
        assert with_usage[-1]["usage"]["total_tokens"] == 12
        assert all(c.get("choices") for c in without)

    def test_a_stream_cut_by_the_upstream_is_never_stored(self, client, upstream):
        body = chat(stream=True, metadata={"fail": "cut"})
        first = post(client, body)
        assert "data: [DONE]" not in first.text
        assert post(client, body).headers["x-cache"] == "MISS"
        assert upstream.calls == 2


class TestUpstreamErrors:
    def test_an_upstream_error_passes_through_and_is_not_cached(self, client, upstream):
        body = chat(metadata={"fail": "429"})
        r = post(client, body)
        assert r.status_code == 429 and r.json()["error"]["message"] == "injected 429"
        assert post(client, body).status_code == 429 and upstream.calls == 2

    def test_a_stream_error_before_the_first_chunk_keeps_its_status(self, client):
        r = post(client, chat(stream=True, metadata={"fail": "503"}))
        assert r.status_code == 503 and r.headers["x-cache"] == "MISS"


class TestLiveData:
    @pytest.mark.parametrize("extra", [
        {"search_parameters": {"mode": "on"}}, {"plugins": [{"id": "web"}]},
        {"model": "echo-1:online"}, {"tools": [{"type": "web_search_preview"}]},
    ])
    def test_a_live_data_request_bypasses_and_says_why(self, client, upstream, extra):
        for _ in range(2):
            r = post(client, {**chat("what happened today?"), **extra})
            assert r.headers["x-cache"] == "BYPASS", r.text
        assert r.headers["x-cache-reason"].startswith("live data")
        assert upstream.calls == 2


class TestBadInput:
    @pytest.mark.parametrize("body,field", [
        ({"model": "m", "messages": "hi"}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ([1, 2], "body"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
         "temperature"),
    ])
    def test_bad_input_is_a_4xx_naming_the_field_and_the_fix(self, client, body, field):
        r = post(client, body)
        assert 400 <= r.status_code < 500
        err = r.json()["error"]
        assert err["param"] == field and err["fix"]

    @pytest.mark.parametrize("body,field", [
        (chat(logit_bias={"--5": 1}), "logit_bias.--5"),
        (chat(logit_bias={"\u00b2": 1}), "logit_bias.\u00b2"),
        # an Arabic-Indic three: int() reads it as 3, so it would share "3"'s entry
        (chat(logit_bias={"\u0663": 1}), "logit_bias.\u0663"),
    ])
    def test_what_str_isdigit_passes_but_a_token_id_is_not_is_a_400(self, client, body, field):
        r = post(client, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text

    @pytest.mark.parametrize("value", [b"\xb2", "\u0663".encode(), b"9" * 5000])
    def test_a_max_age_of_odd_digits_is_a_400_or_clamped_never_a_500(self, client, value):
        # b"\xb2" is "\u00b2" in latin-1 (how header bytes are read): str.isdigit() is true
        r = client.post("/v1/chat/completions", json=chat(),
                        headers={**auth(), "Cache-Control": b"max-age=" + value})
        assert r.status_code in (200, 400), r.text
        if r.status_code == 400:
            assert r.json()["error"]["param"] == "Cache-Control"

    @pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/cache/lookup"])
    def test_a_body_nested_deeper_than_can_be_sent_on_is_a_400(self, client, route):
        deep = "1"
        for _ in range(254):
            deep = f"[{deep}]"
        body = orjson.dumps(chat()).replace(b'"temperature"', b'"x_deep":' + deep.encode()
                                            + b',"temperature"')
        if route.endswith("lookup"):
            body = b'{"request":' + body + b"}"
        r = client.post(route, content=body, headers={**auth(), "Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, r.text

    @pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/cache/lookup"])
    def test_integers_beyond_64_bits_are_refused_not_rounded_into_one_key(self, client, route):
        def send(n: str) -> Any:
            body = orjson.dumps(chat()).replace(b'"temperature"', b'"x_n":' + n.encode()
                                                + b',"temperature"')
            if route.endswith("lookup"):
                body = b'{"request":' + body + b"}"
            return client.post(route, content=body,
                               headers={**auth(), "Content-Type": "application/json"})

        for n in ("100000000000000000000001", "100000000000000000000002", "-9223372036854775809"):
            r = send(n)
            assert r.status_code == 400 and "64-bit" in r.json()["error"]["message"], r.text
        assert send("18446744073709551615").status_code == 200
        # A long run of digits in text is no number: served as usual.
        assert post(client, chat("call 100000000000000000000001")).status_code == 200

    def test_invalid_json_is_a_400(self, client):
        r = client.post("/v1/chat/completions", content=b"{nope", headers=auth())
        assert r.status_code == 400 and r.json()["error"]["param"] == "body"

    def test_a_body_over_the_limit_is_a_413(self, client):
        r = post(client, chat("x" * 30_000))
        assert r.status_code == 413 and "max_request_bytes" in r.json()["error"]["message"]

    def test_an_entry_over_the_limit_is_served_but_not_stored(self, client, upstream):
        body = chat(metadata={"pad": 60_000})
        first = post(client, body)
        assert first.status_code == 200 and len(first.content) > 60_000
        assert post(client, body).headers["x-cache"] == "MISS"
        assert upstream.calls == 2
        small = chat(metadata={"pad": 100})
        post(client, small)
        assert post(client, small).headers["x-cache"] == "HIT"

    @pytest.mark.parametrize("header", [None, "Bearer nope-not-a-key-000000", "Basic abc"])
    def test_requests_without_a_tenant_key_are_401(self, client, header):
        headers = {"Authorization": header} if header else {}
        r = client.post("/v1/chat/completions", json=chat(), headers=headers)
        assert r.status_code == 401 and r.json()["error"]["param"] == "Authorization"

    def test_the_admin_key_is_not_a_tenant_key(self, client):
        assert post(client, chat(), ADMIN).status_code == 401


class TestObservers:
    def test_every_hit_and_fill_reaches_the_observers_even_after_one_raised(self, client,
                                                                             recorder):
        post(client, chat())
        post(client, chat())
        kinds = [e.kind for e in recorder.events]
        assert kinds == ["fill", "hit"]
        hit = recorder.events[1]
        assert hit.tenant == "team-a" and hit.entry is not None
        assert hit.expected_epoch == hit.entry.epoch and hit.raw
        assert hit.response["choices"] == post(client, chat()).json()["choices"]

    def test_no_event_for_a_bypass(self, client, recorder):
        post(client, chat(temperature=1))
        assert recorder.events == []


class TestCacheApi:
    def lookup(self, client, request, key=KEY_A, **headers):
        return client.post("/v1/cache/lookup", json={"request": request},
                           headers={**auth(key), **headers})

    def store(self, client, token, response=None, key=KEY_A, **extra):
        body = {"fill_token": token, **extra}
        if response is not None:
            body["response"] = response
        return client.post("/v1/cache/store", json=body, headers=auth(key))

    def answer(self, text="hi there"):
        return {"id": "x", "object": "chat.completion", "created": 1, "model": "echo-1",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}]}

    def test_a_miss_gives_a_token_and_the_stored_answer_then_hits(self, client):
        miss = self.lookup(client, chat("q1")).json()
        assert miss["status"] == "miss" and miss["fill_token"]
        assert self.store(client, miss["fill_token"], self.answer()).json() == {
            "stored": True, "reason": None}
        hit = self.lookup(client, chat("q1")).json()
        assert hit["status"] == "hit" and hit["response"] == self.answer() and hit["age"] == 0
        # and the proxy serves the same entry
        assert post(client, chat("q1")).json() == self.answer()

    def test_a_tampered_token_is_refused(self, client):
        token = self.lookup(client, chat("q2")).json()["fill_token"]
        payload, mac = token.split(".")
        forged = payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1] + "." + mac
        r = self.store(client, forged, self.answer())
        assert r.status_code == 422 and r.json()["error"]["param"] == "fill_token"

    def test_a_token_is_bound_to_its_tenant(self, client):
        token = self.lookup(client, chat("q3"), KEY_A).json()["fill_token"]
        assert self.store(client, token, self.answer(), key=KEY_B).status_code == 422

    def test_a_store_after_a_rollout_is_refused(self, client):
        token = self.lookup(client, chat("q4")).json()["fill_token"]
        client.post("/admin/models/echo-1/rollout", json={"version": "v2", "create": True},
                    headers=auth(ADMIN))
        r = self.store(client, token, self.answer())
        assert r.status_code == 409 and r.json()["error"]["code"] == "stale_epoch"

    def test_an_incomplete_answer_is_refused(self, client):
        token = self.lookup(client, chat("q5")).json()["fill_token"]
        ans = self.answer()
        ans["choices"][0]["finish_reason"] = None
        r = self.store(client, token, ans)
        assert r.status_code == 422
        assert r.json()["error"]["param"] == "response.choices[0].finish_reason"

    @pytest.mark.parametrize(("answer", "param"), [
        ({"choices": ["x"]}, "response.choices[0]"),
        ({"choices": [{"index": [1], "finish_reason": "stop", "message": {}}]},
         "response.choices[0].index"),
        ({"choices": [{"index": 0, "finish_reason": "stop", "message": "hi"}]},
         "response.choices[0].message"),
        ({"choices": []}, "response.choices"),
        ([{"choices": ["x"]}], "chunks[0].choices[0]"),
        ([{"choices": [{"index": 0, "delta": "hi", "finish_reason": "stop"}]}],
         "chunks[0].choices[0].delta"),
        ([{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
          {"choices": [{"index": "1", "delta": {}, "finish_reason": "stop"}]}],
         "chunks[1].choices[0].index"),
    ])
    def test_an_answer_not_in_the_openai_shape_is_a_422_naming_the_field_and_not_stored(
            self, client, answer, param):
        req = chat(f"malformed {param}", stream=isinstance(answer, list))
        token = self.lookup(client, req).json()["fill_token"]
        body = {"chunks": answer} if isinstance(answer, list) else {"response": answer}
        r = self.store(client, token, **body)
        assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text
        assert self.lookup(client, req).json()["status"] == "miss"

    @pytest.mark.parametrize("extra", [b"100000000000000000000001", b"[" * 300 + b"]" * 300])
    def test_an_answer_that_cannot_be_sent_back_is_a_422_never_a_500(self, client, extra):
        token = self.lookup(client, chat(f"unsendable {len(extra)}")).json()["fill_token"]
        body = orjson.dumps({"fill_token": token, "response": self.answer()})
        body = body.replace(b'"created":1', b'"created":' + extra)
        r = client.post("/v1/cache/store", content=body,
                        headers={**auth(), "Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["param"] == "response", r.text

    def test_a_fill_token_stores_once(self, client):
        token = self.lookup(client, chat("once")).json()["fill_token"]
        assert self.store(client, token, self.answer("first")).json()["stored"]
        again = self.store(client, token, self.answer("overwritten"))
        assert again.status_code == 409 and again.json()["error"]["code"] == "fill_token_used"
        assert self.lookup(client, chat("once")).json()["response"] == self.answer("first")
        # ... nor re-creates the entry after the tenant's entries were deleted.
        assert client.delete("/admin/tenants/team-a/entries",
                             headers=auth(ADMIN)).json()["deleted"] >= 1
        assert self.store(client, token, self.answer("back")).status_code == 409
        assert self.lookup(client, chat("once")).json()["status"] == "miss"

    def test_a_request_that_does_not_match_the_token_is_refused(self, client):
        token = self.lookup(client, chat("q6")).json()["fill_token"]
        r = self.store(client, token, self.answer(), request=chat("something else"))
        assert r.status_code == 422 and r.json()["error"]["param"] == "request"

    def test_an_oversized_entry_is_a_413(self, client):
        token = self.lookup(client, chat("q7")).json()["fill_token"]
        r = self.store(client, token, self.answer("z" * 60_000))
        assert r.status_code == 413

    def test_a_stored_stream_is_replayed_to_streaming_lookups_and_assembled_for_others(
            self, client):
        req = chat("q8", stream=True)
        token = self.lookup(client, req).json()["fill_token"]
        head = {"id": "s", "object": "chat.completion.chunk", "created": 1, "model": "echo-1"}
        chunks = [
            {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "he"},
                                  "finish_reason": None}]},
            {**head, "choices": [{"index": 0, "delta": {"content": "llo"},
                                  "finish_reason": None}]},
            {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        ]
        assert self.store(client, token, chunks=chunks, request=req).json()["stored"]
        hit = self.lookup(client, req).json()
        assert hit["chunks"] == chunks
        assert hit["response"]["choices"][0]["message"]["content"] == "hello"
        replay = post(client, req)
        assert replay.headers["x-cache"] == "HIT" and sse_chunks(replay.text) == chunks

    def test_a_cut_stream_is_refused(self, client):
        token = self.lookup(client, chat("q9")).json()["fill_token"]
        chunks = [{"choices": [{"index": 0, "delta": {"content": "he"},
                                "finish_reason": None}]}]
        r = self.store(client, token, chunks=chunks)
        assert r.status_code == 422 and r.json()["error"]["param"] == "chunks"

    def test_a_ttl_longer_than_the_tenants_is_refused(self, client):
        token = self.lookup(client, chat("q10")).json()["fill_token"]
        r = self.store(client, token, self.answer(), ttl_seconds=10**9)
        assert r.status_code == 422 and r.json()["error"]["param"] == "ttl_seconds"
        assert self.store(client, token, self.answer(), ttl_seconds=60).json()["stored"]

    def test_a_bypass_gets_no_token(self, client):
        r = self.lookup(client, chat(temperature=1.0)).json()
        assert r["status"] == "bypass" and "fill_token" not in r

    def test_unknown_fields_in_lookup_are_a_422_naming_them(self, client):
        r = client.post("/v1/cache/lookup", json={"request": chat(), "extra": 1},
                        headers=auth())
        assert r.status_code == 422 and r.json()["error"]["param"] == "extra"


class TestAdmin:
    def test_a_rollout_turns_the_next_request_into_a_miss(self, client):
        post(client, chat())
        r = client.post("/admin/models/echo-1/rollout", json={"version": "v2", "create": True},
                        headers=auth(ADMIN))
        assert r.status_code == 200 and r.json()["version"] == "v2" and r.json()["epoch"] > 0
        assert post(client, chat()).headers["x-cache"] == "MISS"
        assert post(client, chat()).headers["x-cache"] == "HIT"

    def test_a_rollout_deletes_the_old_epochs_entries_in_the_background(self, client):
        post(client, chat())
        post(client, chat("other"))
        store = client.app.state.services.store
        assert len(store._items) == 2
        client.post("/admin/models/echo-1/rollout", json={"version": "v2", "create": True},
                    headers=auth(ADMIN))
        import time

        deadline = time.monotonic() + 5
        while store._items and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(store._items) == 0
        post(client, chat())
        assert post(client, chat()).headers["x-cache"] == "HIT"

    def test_a_model_name_with_slashes_rolls_out(self, client):
        # Gateways name models by provider path (LiteLLM: "openai/gpt-4o").
        body = chat(model="openai/echo-1")
        post(client, body)
        r = client.post("/admin/models/openai/echo-1/rollout",
                        json={"version": "v2", "create": True},
                        headers=auth(ADMIN))
        assert r.status_code == 200 and r.json()["model"] == "openai/echo-1"
        assert post(client, body).headers["x-cache"] == "MISS"

    def test_a_rollback_gets_a_fresh_epoch(self, client):
        e1 = client.post("/admin/models/m/rollout", json={"version": "a", "create": True},
                         headers=auth(ADMIN)).json()["epoch"]
        client.post("/admin/models/m/rollout", json={"version": "b", "create": True},
                    headers=auth(ADMIN))
        e3 = client.post("/admin/models/m/rollout", json={"version": "a", "create": True},
                         headers=auth(ADMIN)).json()["epoch"]
        assert e3 > e1
        models = client.get("/admin/models", headers=auth(ADMIN)).json()["models"]
        assert {"model": "m", "version": "a", "epoch": e3} in models

    def test_admin_endpoints_refuse_tenant_keys(self, client):
        r = client.post("/admin/models/m/rollout", json={"version": "a", "create": True},
                        headers=auth(KEY_A))
        assert r.status_code == 401
        assert client.get("/admin/models").status_code == 401

    def test_deleting_a_tenants_entries_leaves_the_others(self, client):
        post(client, chat(), KEY_A)
        post(client, chat(), KEY_B)
        r = client.delete("/admin/tenants/team-a/entries", headers=auth(ADMIN))
        assert r.json() == {"tenant": "team-a", "deleted": 1}
        assert post(client, chat(), KEY_A).headers["x-cache"] == "MISS"
        assert post(client, chat(), KEY_B).headers["x-cache"] == "HIT"

    def test_deleting_an_unknown_tenant_is_a_404(self, client):
        assert client.delete("/admin/tenants/nobody/entries",
                             headers=auth(ADMIN)).status_code == 404


class TestHealth:
    def test_health_ready_and_metrics(self, client):
        post(client, chat())
        post(client, chat())
        assert client.get("/healthz").json()["status"] == "ok"
        assert client.get("/readyz").json()["store"] == "available"
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=auth(KEY_A)).status_code == 401
        text = client.get("/metrics", headers=auth(ADMIN)).text
        assert 'cachesvc_lookups_total{outcome="hit",route="proxy"}' in text
        assert "cachesvc_lookup_seconds_bucket" in text
        assert "cachesvc_breaker_state" in text


class FailingStore(EmbeddedStore):
    def __init__(self) -> None:
        super().__init__(max_bytes=1 << 20, max_entry_bytes=1 << 20)
        self.broken = False
        self.calls = 0

    async def get(self, key):  # type: ignore[override]
        self.calls += 1
        if self.broken:
            raise ConnectionError("store down")
        return await super().get(key)

    async def set(self, key, value, *, ttl=None):  # type: ignore[override]
        self.calls += 1
        if self.broken:
            raise ConnectionError("store down")
        return await super().set(key, value, ttl=ttl)


class TestStoreFailures:
    def test_a_dead_store_is_a_miss_and_the_breaker_stops_calling_it(self, tmp_path):
        store = FailingStore()
        up = EchoUpstream()
        settings = make_settings(tmp_path, breaker={"failures": 3, "reset_after_s": 0.2})
        with TestClient(create_app(settings, upstream=up, store=store)) as c:
            post(c, chat())
            store.broken = True
            for _ in range(10):
                r = post(c, chat())
                assert r.status_code == 200 and r.headers["x-cache"] == "MISS"
            assert store.calls < 2 + 10 * 2  # the breaker skipped calls
            assert c.get("/readyz").json()["store"] == "unavailable"
            store.broken = False
            import time

            time.sleep(0.25)
            post(c, chat())  # the probe succeeds and closes the breaker
            assert post(c, chat()).headers["x-cache"] == "HIT"
            assert c.get("/readyz").json()["store"] == "available"


class TestEpochViews:
    """A rollout written to the registry by another replica (this one's view not told yet)."""

    def rollout_elsewhere(self, c: TestClient, version: str) -> None:
        registry = c.app.state.services.versions.registry
        c.portal.call(registry.rollout, "echo-1", version)

    def test_strict_mode_refuses_an_entry_whose_epoch_has_passed(self, tmp_path):
        settings = make_settings(tmp_path, cache={"strict_epoch": True,
                                                  "registry_refresh_s": 30.0})
        with TestClient(create_app(settings, upstream=EchoUpstream())) as c:
            c.app.state.services.versions.view.poll_interval = 3600  # no events applied
            post(c, chat())
            assert post(c, chat()).headers["x-cache"] == "HIT"
            self.rollout_elsewhere(c, "v9")
            r = post(c, chat())
            assert r.headers["x-cache"] == "MISS" and "strict" in r.headers["x-cache-reason"]

    def test_without_strict_mode_the_view_catches_up_within_its_poll_interval(self, tmp_path):
        settings = make_settings(tmp_path, cache={"registry_refresh_s": 2.0})
        with TestClient(create_app(settings, upstream=EchoUpstream())) as c:
            post(c, chat())
            self.rollout_elsewhere(c, "v9")
            import time

            time.sleep(0.6)  # > poll interval (0.1 s); the event reaches this replica's view
            assert post(c, chat()).headers["x-cache"] == "MISS"


class TestStoredMaterial:
    """Entries carry the key material they were filled for, so the offline scan can check their
    digests and read their request back (``[cache] store_material``)."""

    @staticmethod
    def _entries(store: EmbeddedStore) -> list[Any]:
        async def collect() -> list[Any]:
            return [decode_entry(raw, keys=KEYS) async for _, raw in store.scan_entries()]

        return asyncio.run(collect())

    def test_a_proxy_fill_stores_material_that_rebuilds_the_entry_key(self, tmp_path):
        store = EmbeddedStore()
        with TestClient(create_app(make_settings(tmp_path), upstream=EchoUpstream(),
                                   store=store)) as c:
            assert post(c, chat("keep my material")).headers["x-cache"].startswith("MISS")
        (entry,) = self._entries(store)
        assert entry.material is not None
        key = rebuild_key(entry.material, secret=b"test-secret-0123456789abcdef")
        assert bytes(key.digest) == entry.digest
        assert bytes(key.material_digest) == entry.material_digest
        assert key.canonical.fields["messages"][0]["content"] == "keep my material"

    def test_with_store_material_off_entries_carry_none(self, tmp_path):
        store = EmbeddedStore()
        settings = make_settings(tmp_path, cache={"store_material": False})
        with TestClient(create_app(settings, upstream=EchoUpstream(), store=store)) as c:
            post(c, chat("no material"))
            assert post(c, chat("no material")).headers["x-cache"] == "HIT"
        (entry,) = self._entries(store)
        assert entry.material is None

    def test_material_never_costs_an_entry_its_place(self, tmp_path):
        """An answer that fits limits.max_entry_bytes only without its request's material is
        stored without it, not refused."""
        store = EmbeddedStore()
        prompt = "".join(f"{i:x}" for i in range(40_000))  # ~150 KB, compresses poorly
        settings = make_settings(tmp_path, limits={"max_entry_bytes": 20_000,
                                                   "max_request_bytes": 400_000})
        with TestClient(create_app(settings, upstream=EchoUpstream(), store=store)) as c:
            post(c, chat(prompt, max_tokens=5))
            assert post(c, chat(prompt, max_tokens=5)).headers["x-cache"] == "HIT"
            post(c, chat("short", max_tokens=5))
        entries = self._entries(store)
        assert sorted(e.material is None for e in entries) == [False, True]
