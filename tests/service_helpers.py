"""Factories for the service tests: settings, a uvicorn server in a thread, a fake OpenAI
server around the deterministic upstream."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from cachesvc.errors import UpstreamError
from cachesvc.settings import Settings, load_settings
from cachesvc.streaming import DONE, sse
from tests.support.redis_servers import free_port

KEY_A = "sk-tenant-a-0123456789abcdef"
KEY_A2 = "sk-tenant-a-second-key-0000"
KEY_B = "sk-tenant-b-0123456789abcdef"
KEY_U = "sk-tenant-u-0123456789abcdef"
ADMIN = "sk-admin-0123456789abcdef00"


def make_settings(tmp_path: Any, **overrides: Any) -> Settings:
    base: dict[str, Any] = dict(
        state_dir=str(tmp_path / "state"),
        tenants=[
            {"id": "team-a", "api_keys": [KEY_A, KEY_A2], "canaries": ["CANARY-A-7f3"]},
            {"id": "team-b", "api_keys": [KEY_B]},
            {"id": "team-u", "api_keys": [KEY_U], "scope": "user"},
        ],
        admin={"api_key": ADMIN},
        audit={"sample_rate": 0.0, "fill_sample_rate": 0.0},
        cache={"secret": "test-secret-0123456789abcdef"},
        redis={"timeout_ms": 500},
    )
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return load_settings(None, **base)


def auth(key: str = KEY_A) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "echo-1", "messages": [{"role": "user", "content": content}],
            "temperature": 0, **extra}


class ServerThread:
    """uvicorn serving ``app`` on a free loopback port, in a thread with its own loop;
    ``config`` overrides uvicorn's settings (``loop="uvloop"``)."""

    def __init__(self, app: Any, **config: Any) -> None:
        self.port = free_port()
        self.config = uvicorn.Config(app, **{
            "host": "127.0.0.1", "port": self.port, "log_level": "warning", "loop": "asyncio",
            "lifespan": "on", "access_log": False, **config})
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), "uvicorn did not stop within 15 s"


@contextlib.contextmanager
def serving(app: Any, **config: Any) -> Iterator[ServerThread]:
    with ServerThread(app, **config) as server:
        yield server


def fake_openai_app(upstream: Any) -> Any:
    """An OpenAI-compatible HTTP server answering with ``upstream`` (an ``EchoUpstream``)."""
    app = FastAPI()

    async def handle(request: Request, kind: str) -> Response:
        body = orjson.loads(await request.body())
        try:
            if body.get("stream"):
                agen = upstream.stream(body, kind, tenant="x")
                first = await agen.__anext__()

                async def gen() -> Any:
                    yield sse(first)
                    try:
                        async for c in agen:
                            yield sse(c)
                    except UpstreamError:
                        return  # cut: no [DONE]
                    yield DONE

                return StreamingResponse(gen(), media_type="text/event-stream")
            out = await upstream.complete(body, kind, tenant="x")
        except UpstreamError as exc:
            return Response(orjson.dumps(exc.body), status_code=exc.status,
                            media_type="application/json")
        return Response(orjson.dumps(out), media_type="application/json")

    @app.post("/v1/chat/completions")
    async def _chat(request: Request) -> Response:
        return await handle(request, "chat")

    @app.post("/v1/completions")
    async def _cmpl(request: Request) -> Response:
        return await handle(request, "completion")

    return app
