"""The timing audit's HTTP prober: one request to an OpenAI-compatible endpoint, timed."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from audit import TimingProbeError


class HttpProber:
    """One OpenAI-compatible request with one output token; returns seconds to the answer.

    With ``max_tokens`` 1 the whole response time is the time to first token; a streamed
    request would add SSE framing to both trial kinds alike and measure nothing more.
    """

    def __init__(self, url: str, *, model: str, endpoint: str = "chat", timeout: float = 60.0,
                 clock: Callable[[], float] = time.perf_counter,
                 client: httpx.Client | None = None) -> None:
        if endpoint not in ("chat", "completion"):
            raise ValueError(f"--endpoint {endpoint!r}: use chat or completion")
        self.url = _v1(url) + ("/chat/completions" if endpoint == "chat" else "/completions")
        self.model = model
        self.endpoint = endpoint
        self._clock = clock
        self._client = client or httpx.Client(timeout=timeout)

    def body(self, prompt: str, user: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": 1, "temperature": 0}
        if user is not None:
            body["user"] = user
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body

    def __call__(self, *, key: str, prompt: str, user: str | None = None) -> float:
        body = self.body(prompt, user)
        # NOTE: no-store keeps the probes' random prompts out of the tenant's response cache (a
        # run would otherwise leave thousands of entries nobody will ask for again); a prefix
        # cache behind the service still sees them, which is what the audit measures.
        headers = {"Authorization": f"Bearer {key}", "Cache-Control": "no-store"}
        t0 = self._clock()
        try:
            resp = self._client.post(self.url, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise TimingProbeError(
                f"{self.url}: {exc!r}; check --url and that the server is up") from exc
        elapsed = self._clock() - t0
        if resp.status_code != 200:
            raise TimingProbeError(
                f"{self.url} answered {resp.status_code} for key ...{key[-4:]}: "
                f"{resp.text[:200]}; check the key and --model")
        return elapsed

    def close(self) -> None:
        self._client.close()


def discover_model(url: str, *, key: str, timeout: float = 10.0) -> str:
    """The first model ``GET /v1/models`` lists, for ``--model`` left out."""
    base = _v1(url)
    try:
        resp = httpx.get(base + "/models", headers={"Authorization": f"Bearer {key}"},
                         timeout=timeout)
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])
    except Exception as exc:
        raise TimingProbeError(
            f"{base}/models did not name a model ({exc!r}); pass --model") from exc


def _v1(url: str) -> str:
    """``url`` ending in ``/v1`` (added when missing)."""
    base = url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"
