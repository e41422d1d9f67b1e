"""The lean path for the hot routes (cachesvc/api/lean.py): it answers exactly as the full
FastAPI stack does (edge middleware such as the body limit included), and it is the path
actually taken."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.middleware.base import BaseHTTPMiddleware

from cachesvc.app import create_app
from cachesvc.echo_upstream import EchoUpstream
from tests.service_helpers import KEY_B, auth, chat, make_settings


class _Passthrough:
    """A middleware that does nothing: added with ``add_middleware``, it sends every route
    through FastAPI's full stack (middleware, router, request handler)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


class _Seen:
    """Wraps the app's middleware stack and records the paths that went through it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.paths: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.paths.append(scope["path"])
        await self.inner(scope, receive, send)


def _app(tmp_path: Any) -> Any:
    return create_app(make_settings(tmp_path, limits={"max_request_bytes": 4_000}),
                      upstream=EchoUpstream())


# (name, path, body: JSON, raw bytes, or a tuple of chunks; extra headers). Each case runs after
# the first, which fills the entry the hits read.
CASES: list[tuple[str, str, Any, dict[str, str]]] = [
    ("miss then fill", "/v1/chat/completions", chat("lean"), {}),
    ("hit", "/v1/chat/completions", chat("lean"), {}),
    ("streamed hit", "/v1/chat/completions", chat("lean", stream=True), {}),
    ("max-age", "/v1/chat/completions", chat("lean"), {"Cache-Control": "max-age=0"}),
    ("bad max-age", "/v1/chat/completions", chat("lean"), {"Cache-Control": "max-age=x"}),
    ("only-if-cached miss", "/v1/chat/completions", chat("other"),
     {"Cache-Control": "only-if-cached"}),
    ("bypass", "/v1/chat/completions", chat("lean", temperature=0.7), {}),
    ("completion", "/v1/completions", {"model": "echo-1", "prompt": "hi", "temperature": 0}, {}),
    ("lookup hit", "/v1/cache/lookup", {"request": chat("lean")}, {}),
    ("lookup miss", "/v1/cache/lookup", {"request": chat("nothing")}, {}),
    ("lookup unknown field", "/v1/cache/lookup", {"request": chat("x"), "extra": 1}, {}),
    ("lookup bad kind", "/v1/cache/lookup", {"request": chat("x"), "kind": "image"}, {}),
    ("not json", "/v1/chat/completions", b"{nope", {}),
    ("empty body", "/v1/cache/lookup", b"", {}),
    ("not an object", "/v1/chat/completions", [1, 2], {}),
    ("bad field", "/v1/chat/completions", chat("x", max_tokens=-1), {}),
    ("too large", "/v1/chat/completions", chat("x" * 5_000), {}),
    ("too large, chunked", "/v1/cache/lookup", (b'{"request":', b" " * 5_000, b"}"), {}),
    ("no key", "/v1/chat/completions", chat("lean"), {"Authorization": ""}),
    ("unknown key", "/v1/cache/lookup", {"request": chat("lean")},
     {"Authorization": "Bearer sk-nobody"}),
]

_VOLATILE = {"date", "age", "content-length"}


def _answer(client: TestClient, path: str, body: Any, headers: dict[str, str]) -> Any:
    hdrs = {**auth(), "Content-Type": "application/json", **headers}
    hdrs = {k: v for k, v in hdrs.items() if v}
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers=hdrs)
    elif isinstance(body, tuple):  # sent in chunks, without a Content-Length
        r = client.post(path, content=iter(body), headers=hdrs)
    else:
        r = client.post(path, json=body, headers=hdrs)
    head = {k: v for k, v in r.headers.items() if k not in _VOLATILE}
    body_out: Any = r.json() if r.headers.get("content-type") == "application/json" else r.text
    if isinstance(body_out, dict) and isinstance(body_out.get("fill_token"), str):
        body_out["fill_token"] = "<signed>"  # each token is fresh by design
    return r.status_code, head, body_out


class TestLeanPath:
    @pytest.mark.parametrize("name,path,body,headers", CASES, ids=[c[0] for c in CASES])
    def test_a_hot_route_answers_as_the_full_fastapi_stack_does(self, tmp_path, name, path,
                                                                body, headers):
        answers = []
        for full in (False, True):  # a fresh service each, so one cannot fill for the other
            app = _app(tmp_path / str(full))
            if full:
                app.add_middleware(_Passthrough)
            with TestClient(app) as client:
                _answer(client, *CASES[0][1:])  # the entry the hits read
                answers.append(_answer(client, path, body, headers))
        lean, full = answers
        assert lean == full
        if name != "miss then fill":
            assert lean[0] != 500

    def test_the_hot_routes_skip_the_middleware_stack_and_the_rest_do_not(self, tmp_path):
        app = _app(tmp_path)
        with TestClient(app) as client:
            seen = app.middleware_stack = _Seen(app.build_middleware_stack())
            assert client.post("/v1/chat/completions", json=chat("x"),
                               headers=auth()).status_code == 200
            assert client.post("/v1/completions", json={"model": "echo-1", "prompt": "x"},
                               headers=auth()).status_code == 200
            assert client.post("/v1/cache/lookup", json={"request": chat("x")},
                               headers=auth(KEY_B)).status_code == 200
            assert client.get("/healthz").status_code == 200
            assert client.get("/v1/chat/completions").status_code == 405
        assert seen.paths == ["/healthz", "/v1/chat/completions"]

    def test_with_a_middleware_added_every_route_takes_the_full_stack(self, tmp_path):
        app = _app(tmp_path)
        marked: list[str] = []

        async def mark(request: Any, call_next: Any) -> Any:
            marked.append(request.url.path)
            return await call_next(request)

        app.add_middleware(BaseHTTPMiddleware, dispatch=mark)
        with TestClient(app) as client:
            assert client.post("/v1/chat/completions", json=chat("x"),
                               headers=auth()).status_code == 200
        assert marked == ["/v1/chat/completions"]


class TestEncodedHits:
    def test_a_hit_sends_the_same_bytes_as_rendering_the_answer_would(self, tmp_path):
        import orjson

        with TestClient(_app(tmp_path)) as client:
            miss = client.post("/v1/chat/completions", json=chat("bytes"), headers=auth())
            hits = [client.post("/v1/chat/completions", json=chat("bytes"), headers=auth())
                    for _ in range(2)]
            looked = client.post("/v1/cache/lookup", json={"request": chat("bytes")},
                                 headers=auth())
        assert miss.headers["x-cache"] == "MISS"
        for hit in hits:  # the first encodes the entry's answer, the second reuses it
            assert hit.headers["x-cache"] == "HIT" and hit.content == miss.content
            assert hit.headers["content-length"] == str(len(miss.content))
        assert looked.content == orjson.dumps({"status": "hit", "reason": "verified",
                                               "response": miss.json(),
                                               "age": int(looked.json()["age"])})
