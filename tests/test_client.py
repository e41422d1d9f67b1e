"""``cachesvc.client`` against the service under uvicorn on loopback (embedded store): the
lookup/store protocol, streaming fills, fail-open, the service's errors, timeouts, the breaker
and connection reuse."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from cachesvc.app import create_app
from cachesvc.client import AsyncCacheClient, CacheClient, Lookup
from cachesvc.errors import (
    AuthError,
    BadRequestError,
    CacheUnavailableError,
    StaleEpochError,
    UnprocessableError,
)
from tests.service_helpers import ADMIN, KEY_A, KEY_B, auth, chat, make_settings, serving
from tests.support.echo_upstream import EchoUpstream
from tests.support.redis_servers import free_port

HEAD = {"id": "s", "object": "chat.completion.chunk", "created": 1, "model": "echo-1"}
CHUNKS = [
    {**HEAD, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "he"},
                          "finish_reason": None}]},
    {**HEAD, "choices": [{"index": 0, "delta": {"content": "llo"}, "finish_reason": None}]},
    {**HEAD, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
]


def answer(text: str = "hi there") -> dict[str, Any]:
    return {"id": "x", "object": "chat.completion", "created": 1, "model": "echo-1",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}]}


@pytest.fixture(scope="module")
def service(tmp_path_factory: Any) -> Iterator[Any]:
    app = create_app(make_settings(tmp_path_factory.mktemp("client")), upstream=EchoUpstream())
    peers: list[tuple[str, int]] = []

    @app.middleware("http")
    async def _record_peer(request: Any, call_next: Any) -> Any:
        peers.append(tuple(request.scope["client"]))
        return await call_next(request)

    with serving(app) as server:
        server.peers = peers
        yield server


@pytest.fixture
def client(service: Any) -> Iterator[CacheClient]:
    with CacheClient(service.url, KEY_A, timeout_s=5) as c:
        yield c


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


class TestCacheClient:
    def test_a_miss_gives_a_token_and_the_stored_answer_then_hits(self, client):
        miss = client.lookup(chat("c1"))
        assert miss.status == "miss" and miss.fill_token and not miss.hit
        assert client.store(miss, response=answer(), request=chat("c1")).stored
        hit = client.lookup(chat("c1"))
        assert hit.hit and hit.response == answer() and hit.age == 0 and hit.fill_token is None

    def test_another_tenant_does_not_see_the_entry(self, client, service):
        client.store(client.lookup(chat("c2")), response=answer())
        with CacheClient(service.url, KEY_B) as other:
            assert other.lookup(chat("c2")).status == "miss"

    def test_a_bypassed_request_gets_no_token_and_its_store_is_a_no_op(self, client):
        found = client.lookup(chat("c3", temperature=0.9))
        assert found.status == "bypass" and "temperature" in found.reason
        assert not client.store(found, response=answer()).stored
        assert client.lookup(chat("c3", temperature=0.9)).status == "bypass"

    def test_cache_control_no_cache_skips_the_lookup_but_still_fills(self, client):
        client.store(client.lookup(chat("c4")), response=answer("old"))
        fresh = client.lookup(chat("c4"), cache_control="no-cache")
        assert fresh.status == "miss" and fresh.fill_token
        assert client.store(fresh, response=answer("new")).stored
        assert client.lookup(chat("c4")).response == answer("new")

    def test_a_completed_stream_passes_through_unchanged_and_is_stored(self, client):
        req = chat("c5", stream=True)
        found = client.lookup(req)
        assert list(client.fill_stream(found, iter(CHUNKS), request=req)) == CHUNKS
        hit = client.lookup(req)
        assert hit.chunks == CHUNKS
        assert hit.response["choices"][0]["message"]["content"] == "hello"

    def test_a_stream_the_caller_stops_reading_is_not_stored(self, client):
        req = chat("c6", stream=True)
        stream = client.fill_stream(client.lookup(req), iter(CHUNKS))
        next(stream)
        stream.close()
        assert client.lookup(req).status == "miss"

    def test_a_stream_the_model_cuts_is_not_stored_and_its_error_reaches_the_caller(
            self, client):
        req = chat("c7", stream=True)

        def model() -> Iterator[dict[str, Any]]:
            yield CHUNKS[0]
            raise ConnectionResetError("upstream went away")

        with pytest.raises(ConnectionResetError):
            list(client.fill_stream(client.lookup(req), model()))
        assert client.lookup(req).status == "miss"

    def test_requests_share_one_keep_alive_connection(self, client, service):
        before = len(service.peers)
        for i in range(10):
            client.lookup(chat(f"c8-{i}"))
        assert len(set(service.peers[before:])) == 1


class TestFailOpen:
    def test_a_service_that_is_down_is_a_miss_with_nothing_to_store(self):
        with CacheClient(closed_port_url(), KEY_A) as down:
            found = down.lookup(chat())
            assert found.status == "error" and found.fill_token is None
            assert isinstance(found.error, CacheUnavailableError)
            assert not down.store(found, response=answer()).stored

    def test_a_hung_service_costs_at_most_the_timeout(self):
        with socket.socket() as listener:  # accepts connections, never answers
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            url = f"http://127.0.0.1:{listener.getsockname()[1]}"
            with CacheClient(url, KEY_A, timeout_s=0.2) as hung:
                t0 = time.monotonic()
                found = hung.lookup(chat())
                elapsed = time.monotonic() - t0
        assert found.status == "error"
        # 0.2 s timeout; the bound leaves room for a loaded CI machine, not for a hang.
        assert elapsed < 2.0

    def test_the_breaker_stops_calling_a_failing_service_and_probes_after_the_reset(self):
        calls = []
        now = [0.0]

        def refuse(request: httpx.Request) -> httpx.Response:
            calls.append(request.url.path)
            raise httpx.ConnectError("refused", request=request)

        with CacheClient("http://cache", KEY_A, transport=httpx.MockTransport(refuse),
                         breaker_failures=2, breaker_reset_s=5.0, clock=lambda: now[0]) as c:
            for _ in range(5):
                assert c.lookup(chat()).status == "error"
            assert len(calls) == 2
            now[0] = 6.0
            c.lookup(chat())
            assert len(calls) == 3

    def test_a_url_that_is_not_the_cache_service_is_an_error_not_a_crash(self):
        def other(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, json={"hello": "world"})

        with CacheClient("http://elsewhere", KEY_A, transport=httpx.MockTransport(other)) as c:
            found = c.lookup(chat())
        assert found.status == "error" and isinstance(found.error, CacheUnavailableError)

    def test_a_refused_request_is_an_error_result_naming_the_field(self, client):
        found = client.lookup({"model": "echo-1", "temperature": 0})
        assert found.status == "error"
        assert isinstance(found.error, BadRequestError) and found.error.field == "kind"


class TestRaisingErrors:
    @pytest.fixture
    def strict(self, service: Any) -> Iterator[CacheClient]:
        with CacheClient(service.url, KEY_A, fail_open=False, timeout_s=5) as c:
            yield c

    def test_a_service_that_is_down_raises_cache_unavailable(self):
        with (CacheClient(closed_port_url(), KEY_A, fail_open=False) as down,
              pytest.raises(CacheUnavailableError, match="unreachable")):
            down.lookup(chat())

    def test_an_unknown_key_raises_auth_error(self, service):
        with (CacheClient(service.url, "sk-nobody-0123456789abcdef", fail_open=False) as c,
              pytest.raises(AuthError)):
            c.lookup(chat())

    def test_a_store_after_a_rollout_raises_stale_epoch(self, strict, service):
        found = strict.lookup(chat("c9", model="client-roll"))
        httpx.post(service.url + "/admin/models/client-roll/rollout",
                   json={"version": "2", "create": True},
                   headers=auth(ADMIN)).raise_for_status()
        with pytest.raises(StaleEpochError) as err:
            strict.store(found, response=answer())
        assert err.value.field == "fill_token" and err.value.fix

    def test_a_forged_token_raises_unprocessable_naming_the_token(self, strict):
        forged = Lookup(status="miss", reason="", fill_token="x.y")
        with pytest.raises(UnprocessableError) as err:
            strict.store(forged, response=answer())
        assert err.value.field == "fill_token"

    def test_a_value_that_is_not_json_raises_bad_request(self, strict):
        with pytest.raises(BadRequestError, match="JSON"):
            strict.lookup(chat(tools=[object()]))


class TestAsyncCacheClient:
    async def test_a_miss_is_filled_then_hits(self, service):
        async with AsyncCacheClient(service.url, KEY_A, timeout_s=5) as c:
            miss = await c.lookup(chat("a1"))
            assert miss.status == "miss"
            assert (await c.store(miss, response=answer("async"))).stored
            assert (await c.lookup(chat("a1"))).response == answer("async")

    async def test_a_completed_stream_is_stored_and_a_cut_one_is_not(self, service):
        async def model(n: int) -> Any:
            for chunk in CHUNKS[:n]:
                yield chunk

        async with AsyncCacheClient(service.url, KEY_A, timeout_s=5) as c:
            full, cut = chat("a2", stream=True), chat("a3", stream=True)
            assert [x async for x in c.fill_stream(await c.lookup(full), model(3))] == CHUNKS
            assert [x async for x in c.fill_stream(await c.lookup(cut), model(2))] == CHUNKS[:2]
            assert (await c.lookup(full)).chunks == CHUNKS
            assert (await c.lookup(cut)).status == "miss"

    async def test_a_service_that_is_down_fails_open_or_raises_as_asked(self):
        url = closed_port_url()
        async with AsyncCacheClient(url, KEY_A) as lenient:
            assert (await lenient.lookup(chat())).status == "error"
        async with AsyncCacheClient(url, KEY_A, fail_open=False) as strict:
            with pytest.raises(CacheUnavailableError):
                await strict.lookup(chat())
