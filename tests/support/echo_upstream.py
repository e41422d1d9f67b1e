"""A deterministic upstream for tests and benchmarks: the answer is a function of the request.

The reply text names a digest of the request, so two different requests never get the same
answer and a wrong hit is visible. It streams in several chunks, emits reasoning content and,
when the request offers tools, a tool call split across chunks, so replay can be checked field
by field. ``calls`` counts upstream calls (single-flight tests), ``delay_s`` slows each call,
a request whose ``metadata`` has ``{"fail": "<status>"}`` gets that error (``"cut"``: the
stream stops half-way), and ``{"pad": N}`` adds N characters to the answer.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import orjson

from cachesvc.errors import UpstreamError
from cachesvc.upstream import IncompleteStreamError


class EchoUpstream:
    def __init__(self, *, delay_s: float = 0.0, created: int = 1_700_000_000) -> None:
        self.delay_s = delay_s
        self.created = created
        self.calls = 0

    def _digest(self, body: dict[str, Any]) -> str:
        clean = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "user")}
        return hashlib.sha256(orjson.dumps(clean, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]

    def _check(self, body: dict[str, Any]) -> None:
        fail = (body.get("metadata") or {}).get("fail") if isinstance(body, dict) else None
        if fail == "cut":
            return
        if fail:
            raise UpstreamError(int(fail), {"error": {"message": f"injected {fail}",
                                                      "type": "server_error", "code": None}})

    def _begin(self, body: dict[str, Any]) -> tuple[str, str, str, dict[str, Any]]:
        """Check ``body``; its digest, reasoning, answer text and the response head."""
        self._check(body)
        d, reasoning, text = self._parts(body)
        head = {"id": f"cmpl-{d}", "created": self.created, "model": body.get("model"),
                "system_fingerprint": "fp_echo"}
        return d, reasoning, text, head

    def _parts(self, body: dict[str, Any]) -> tuple[str, str, str]:
        d = self._digest(body)
        pad = (body.get("metadata") or {}).get("pad")
        tail = " " + "p" * int(pad) if isinstance(pad, int) and pad > 0 else ""
        return d, f"thinking about {d}", f"echo {d} for {body.get('model')}{tail}"

    async def complete(self, body: dict[str, Any], kind: str, *, tenant: str) -> dict[str, Any]:
        self.calls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        d, reasoning, text, head = self._begin(body)
        usage = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
        if kind == "completion":
            return {**head, "object": "text_completion", "usage": usage,
                    "choices": [{"index": 0, "text": text, "logprobs": None,
                                 "finish_reason": "stop"}]}
        message: dict[str, Any] = {"role": "assistant", "content": text,
                                   "reasoning_content": reasoning}
        finish = "stop"
        if body.get("tools"):
            name = body["tools"][0].get("function", {}).get("name", "f")
            message["tool_calls"] = [{"id": f"call_{d[:8]}", "type": "function",
                                      "function": {"name": name, "arguments": f'{{"q": "{d}"}}'}}]
            finish = "tool_calls"
        return {**head, "object": "chat.completion", "usage": usage,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": finish}]}

    async def stream(self, body: dict[str, Any], kind: str, *, tenant: str
                     ) -> AsyncIterator[dict[str, Any]]:
        self.calls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        d, reasoning, text, head = self._begin(body)
        words = text.split(" ")
        cut = (body.get("metadata") or {}).get("fail") == "cut"
        if kind == "completion":
            obj = "text_completion"
            for i, w in enumerate(words):
                yield {**head, "object": obj, "choices": [
                    {"index": 0, "text": (" " if i else "") + w, "logprobs": None,
                     "finish_reason": None}]}
                if cut and i == 1:
                    raise IncompleteStreamError("injected cut")
            yield {**head, "object": obj, "choices": [
                {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}]}
        else:
            obj = "chat.completion.chunk"
            yield {**head, "object": obj, "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}]}
            for part in reasoning.split(" "):
                yield {**head, "object": obj, "choices": [
                    {"index": 0, "delta": {"reasoning_content": part + " "}, "logprobs": None,
                     "finish_reason": None}]}
            for i, w in enumerate(words):
                yield {**head, "object": obj, "choices": [
                    {"index": 0, "delta": {"content": (" " if i else "") + w}, "logprobs": None,
                     "finish_reason": None}]}
                if cut and i == 1:
                    raise IncompleteStreamError("injected cut")
            finish = "stop"
            if body.get("tools"):
                name = body["tools"][0].get("function", {}).get("name", "f")
                args = f'{{"q": "{d}"}}'
                yield {**head, "object": obj, "choices": [{"index": 0, "delta": {"tool_calls": [
                    {"index": 0, "id": f"call_{d[:8]}", "type": "function",
                     "function": {"name": name, "arguments": args[:5]}}]},
                    "logprobs": None, "finish_reason": None}]}
                yield {**head, "object": obj, "choices": [{"index": 0, "delta": {"tool_calls": [
                    {"index": 0, "function": {"arguments": args[5:]}}]},
                    "logprobs": None, "finish_reason": None}]}
                finish = "tool_calls"
            yield {**head, "object": obj, "choices": [
                {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}]}
        if (body.get("stream_options") or {}).get("include_usage"):
            yield {**head, "object": obj, "choices": [],
                   "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}}

    async def aclose(self) -> None:
        return None
