"""Bodies and slow clients, over a real socket (uvicorn with the service's protocol): every route
has a body limit enforced before the body is read, a plain client reads the 413 (not a reset),
and a connection slow to send its request head or its body is closed."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvicorn

from cachesvc.app import create_app
from cachesvc.http_protocol import http_protocol
from tests.service_helpers import ADMIN, KEY_A, chat, make_settings
from tests.support.echo_upstream import EchoUpstream
from tests.support.redis_servers import free_port

REQUEST_LIMIT = 20_000
ENTRY_LIMIT = 50_000
STORE_LIMIT = REQUEST_LIMIT + 2 * ENTRY_LIMIT
HEAD_TIMEOUT = 0.5
BODY_TIMEOUT = 0.5


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = make_settings(
        tmp_path_factory.mktemp("limits"),
        limits={"max_request_bytes": REQUEST_LIMIT, "max_entry_bytes": ENTRY_LIMIT,
                "header_timeout_s": HEAD_TIMEOUT, "body_timeout_s": BODY_TIMEOUT})
    port = free_port()
    config = uvicorn.Config(create_app(settings, upstream=EchoUpstream()), host="127.0.0.1",
                            port=port, log_level="warning", loop="asyncio", lifespan="on",
                            http=http_protocol(header_timeout_s=settings.limits.header_timeout_s,
                                    body_timeout_s=settings.limits.body_timeout_s))
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=15)


def _urllib_post(server: str, path: str, body: bytes, key: str = KEY_A) -> tuple[int, Any]:
    req = urllib.request.Request(f"http://{server}{path}", data=body, method="POST", headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def _raw(server: str, data: bytes, *, wait: float = 5.0) -> bytes:
    """Send ``data`` on a fresh connection; everything the server answers before closing."""
    host, port = server.split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                got = s.recv(65536)
            except TimeoutError:
                return out
            if not got:
                return out
            out += got


class TestBodyLimits:
    @pytest.mark.parametrize(("path", "limit"), [
        ("/v1/chat/completions", REQUEST_LIMIT), ("/v1/cache/lookup", REQUEST_LIMIT),
        ("/v1/cache/store", STORE_LIMIT), ("/admin/models/echo-1/rollout", 64 * 1024),
        ("/healthz", 64 * 1024)])
    def test_every_route_refuses_an_oversize_body_and_a_plain_client_reads_the_413(
            self, server: str, path: str, limit: int) -> None:
        body = orjson.dumps({"request": chat("x" * (limit + 10)), "fill_token": "t" * 40,
                             "version": "v" * 10})
        status, answer = _urllib_post(server, path, body,
                                      key=ADMIN if path.startswith("/admin") else KEY_A)
        assert status == 413, answer
        assert answer["error"]["param"] == "body" and str(limit) in answer["error"]["message"]

    def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_sent(
            self, server: str) -> None:
        """With Expect: 100-continue the client sends nothing more: a 300 MB store is refused
        from its headers alone, at once."""
        t0 = time.monotonic()
        head = (b"POST /v1/cache/store HTTP/1.1\r\nHost: x\r\n"
                b"Authorization: Bearer " + KEY_A.encode() + b"\r\n"
                b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
                b"Content-Length: 300000000\r\n\r\n")
        answer = _raw(server, head)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert time.monotonic() - t0 < 2.0

    def test_a_chunked_body_over_the_limit_is_a_413(self, server: str) -> None:
        chunk = b"x" * 8192
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(20)) + b"0\r\n\r\n"
        head = (b"POST /v1/cache/lookup HTTP/1.1\r\nHost: x\r\n"
                b"Authorization: Bearer " + KEY_A.encode() + b"\r\n"
                b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        answer = _raw(server, head + chunks)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]

    def test_a_body_within_its_limit_is_served(self, server: str) -> None:
        status, answer = _urllib_post(server, "/v1/chat/completions", orjson.dumps(chat("hi")))
        assert status == 200 and answer["choices"]


class TestSlowClients:
    def test_a_connection_slow_to_send_its_body_is_closed(self, server: str) -> None:
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Authorization: Bearer " + KEY_A.encode() + b"\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"mo")
        t0 = time.monotonic()
        assert _raw(server, head, wait=10.0) == b""
        assert time.monotonic() - t0 < BODY_TIMEOUT + 4.0

    @pytest.mark.parametrize("sent", [b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"])
    def test_a_connection_slow_to_send_its_request_head_is_closed(self, server: str,
                                                                  sent: bytes) -> None:
        t0 = time.monotonic()
        assert _raw(server, sent, wait=10.0) == b""
        # Closed by the server after the header timeout (the bound is generous for a loaded
        # machine; without the timeout the connection would stay open for the full 10 s).
        assert time.monotonic() - t0 < HEAD_TIMEOUT + 4.0

    def test_many_idle_connections_are_all_closed(self, server: str) -> None:
        host, port = server.split(":")
        socks = [socket.create_connection((host, int(port)), timeout=10) for _ in range(100)]
        try:
            time.sleep(HEAD_TIMEOUT + 1.0)
            closed = 0
            for s in socks:
                s.settimeout(3.0)
                try:
                    closed += s.recv(1) == b""
                except (TimeoutError, ConnectionResetError):
                    closed += 0
            assert closed == len(socks)
        finally:
            for s in socks:
                s.close()


class TestMetricsAccess:
    def test_metrics_need_the_metrics_key_or_the_admin_key(self, tmp_path: Path) -> None:
        from fastapi.testclient import TestClient

        settings = make_settings(tmp_path, admin={"api_key": ADMIN,
                                                  "metrics_key": "sk-metrics-0123456789ab"})
        with TestClient(create_app(settings, upstream=EchoUpstream())) as c:
            assert c.get("/metrics").status_code == 401
            assert c.get("/metrics", headers={"Authorization": f"Bearer {KEY_A}"}
                         ).status_code == 401
            for key in ("sk-metrics-0123456789ab", ADMIN):
                r = c.get("/metrics", headers={"Authorization": f"Bearer {key}"})
                assert r.status_code == 200 and "cachesvc_hits" in r.text
