"""The oracles the auditor recomputes answers with: the in-process engine, or an upstream."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import httpx

from audit import Answer, OracleError
from audit.protocols import RequestKind

if TYPE_CHECKING:  # pragma: no cover - the engine is loaded only where it is used
    from gpu_prefix.engine import Engine


class EngineOracle:
    """Recompute with the in-process reference engine, through the same OpenAI translation the
    service uses (``cachesvc.engine_api``), so a deterministic request reproduces exactly."""

    exact = True

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def complete(self, request: Mapping[str, Any], kind: RequestKind, *, tenant: str) -> Answer:
        """In the calling thread (the auditor's worker, or the scan): no event loop or thread
        hop per recompute, and the worker's CPU time includes the model's work."""
        from cachesvc import engine_api

        body = dict(request)
        body["stream"] = False
        body.pop("stream_options", None)
        try:
            out = engine_api.complete_blocking(self.engine, body, kind, tenant=tenant)
        except Exception as exc:
            raise OracleError(f"engine recompute failed: {exc!r}") from exc
        return Answer.of(out)

    def score(self, request: Mapping[str, Any], kind: RequestKind, completion: str, *,
              tenant: str) -> Sequence[float] | None:
        try:
            if kind == "chat":
                prompt_ids = self.engine.chat_prompt_ids(list(request.get("messages") or []))
            else:
                prompt = request.get("prompt")
                if not isinstance(prompt, str):
                    return None
                prompt_ids = self.engine.encode(prompt)
            completion_ids = self.engine.encode(completion)
            if not completion_ids:
                return None
            return list(self.engine.score(prompt_ids, completion_ids))
        except Exception as exc:
            raise OracleError(f"engine scoring failed: {exc!r}") from exc


class UpstreamOracle:
    """Recompute through an OpenAI-compatible upstream. Not exact by default: hosted models are
    not bit-reproducible even at temperature 0, so a text difference alone is not a finding.
    Scoring is not available through the chat API, so sampled answers stay undecided."""

    def __init__(self, url: str, *, api_key: str | None = None, exact: bool = False,
                 timeout: float = 60.0, client: httpx.Client | None = None) -> None:
        self.exact = exact
        self._base = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = client or httpx.Client(timeout=timeout, headers=headers)

    def complete(self, request: Mapping[str, Any], kind: RequestKind, *, tenant: str) -> Answer:
        body = dict(request)
        body["stream"] = False
        body.pop("stream_options", None)
        path = "/chat/completions" if kind == "chat" else "/completions"
        try:
            resp = self._client.post(self._base + path, json=body)
        except httpx.HTTPError as exc:
            raise OracleError(f"upstream {self._base}{path}: {exc!r}") from exc
        if resp.status_code != 200:
            raise OracleError(f"upstream {self._base}{path} answered {resp.status_code}")
        return Answer.of(resp.json())

    def score(self, request: Mapping[str, Any], kind: RequestKind, completion: str, *,
              tenant: str) -> Sequence[float] | None:
        return None
