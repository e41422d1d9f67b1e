"""OpenAI-compatible translation for the reference engine, as plain async functions.

The cache service calls these in process (no HTTP); ``cachesvc.engine_app`` serves them over
HTTP. The engine runs in a worker thread so the event loop never blocks on the model.

Which fields the engine honours, ignores or refuses is decided by the one field table
(``keying.fields``) and applied by ``cachesvc.engine_request``.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

# NOTE: the request's parts are re-exported: callers and tests know them as engine_api's.
from cachesvc.engine_request import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_COMPLETION_MAX_TOKENS,
    EngineRequestError,
    Kind,
    parse_request,
)
from gpu_prefix.engine import Engine, FinalEvent, GenerationParams, GenerationResult, TokenEvent
from gpu_prefix.errors import AdmissionRefusedError, InvalidParamsError

__all__ = [
    "DEFAULT_CHAT_MAX_TOKENS",
    "DEFAULT_COMPLETION_MAX_TOKENS",
    "EngineOverloadedError",
    "EngineRequestError",
    "Kind",
    "complete",
    "complete_blocking",
    "parse_request",
    "stream",
]


class EngineOverloadedError(EngineRequestError):
    """The engine's KV pool is full and its queue too: retry after ``retry_after_s`` (503)."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message, status=503, field=None)


async def _in_thread(fn: Any, *args: Any) -> Any:
    """Run ``fn`` in a thread of its own.

    NOTE: not ``asyncio.to_thread``: the default executor has a handful of workers, so a burst
    would wait invisibly in its queue instead of reaching the engine's admission control, which
    queues with a bound and refuses the rest with a retryable 503.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not fut.done():
            (fut.set_result if ok else fut.set_exception)(value)

    def work() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            outcome = (False, exc)
        else:
            outcome = (True, result)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:
            pass  # the loop is gone; nobody is waiting

    threading.Thread(target=work, name="engine-generate", daemon=True).start()
    return await fut


def _usage(r: GenerationResult) -> dict[str, Any]:
    return {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": len(r.token_ids),
        "total_tokens": r.prompt_tokens + len(r.token_ids),
        "prompt_tokens_details": {"cached_tokens": r.cached_tokens},
    }


def _token_str(engine: Engine, token_id: int) -> str:
    text: str = engine.tokenizer.decode([token_id])
    return text


def _chat_logprob_items(engine: Engine, ids: list[int], lps: list[float],
                        tops: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    items = []
    for tid, lp, top in zip(ids, lps, tops, strict=True):
        s = _token_str(engine, tid)
        items.append({
            "token": s, "logprob": lp, "bytes": list(s.encode("utf-8")),
            "top_logprobs": [
                {"token": (t := _token_str(engine, i)), "logprob": v,
                 "bytes": list(t.encode("utf-8"))} for i, v in top
            ],
        })
    return items


def _completion_logprobs(engine: Engine, ids: list[int], lps: list[float],
                         tops: list[tuple[Any, ...]], offset: int) -> dict[str, Any]:
    tokens = [_token_str(engine, t) for t in ids]
    offsets = []
    pos = offset
    for s in tokens:
        offsets.append(pos)
        pos += len(s)
    return {
        "tokens": tokens,
        "token_logprobs": list(lps),
        "top_logprobs": [{_token_str(engine, i): v for i, v in top} for top in tops],
        "text_offset": offsets,
    }


def _fingerprint(engine: Engine) -> str:
    return f"{engine.model_id}-epoch-{engine.model_epoch}"


def _run_error(exc: BaseException) -> EngineRequestError:
    if isinstance(exc, AdmissionRefusedError):
        return EngineOverloadedError(f"engine overloaded: {exc}", retry_after_s=exc.retry_after_s)
    if isinstance(exc, InvalidParamsError):
        return EngineRequestError(str(exc), status=400, field=exc.field)
    raise exc


async def complete(engine: Engine, body: dict[str, Any], kind: Kind, *,
                   tenant: str) -> dict[str, Any]:
    """Serve one non-streaming request (:func:`complete_blocking` in a thread of its own);
    returns an OpenAI response object."""
    result: dict[str, Any] = await _in_thread(
        functools.partial(complete_blocking, engine, body, kind, tenant=tenant))
    return result


def complete_blocking(engine: Engine, body: dict[str, Any], kind: Kind, *,
                      tenant: str) -> dict[str, Any]:
    """One non-streaming request in the calling thread: :func:`complete` runs it in a thread of
    its own; the auditor's worker calls it directly, so its CPU time counts the model's work."""
    prompt_ids, params, _ = parse_request(engine, body, kind, tenant=tenant)
    try:
        r = engine.generate(prompt_ids, params)
    except (AdmissionRefusedError, InvalidParamsError) as exc:
        raise _run_error(exc) from None
    return _response(engine, kind, params, r)


def _response(engine: Engine, kind: Kind, params: GenerationParams,
              r: GenerationResult) -> dict[str, Any]:
    created = int(time.time())
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": r.text, "refusal": None},
            "logprobs": None,
            "finish_reason": r.finish_reason,
        }
        if params.logprobs:
            choice["logprobs"] = {
                "content": _chat_logprob_items(engine, list(r.token_ids), list(r.logprobs),
                                               list(r.top_logprobs)),
                "refusal": None,
            }
        obj = "chat.completion"
        rid = f"chatcmpl-{uuid.uuid4().hex}"
    else:
        choice = {
            "index": 0,
            "text": r.text,
            "logprobs": _completion_logprobs(engine, list(r.token_ids), list(r.logprobs),
                                             list(r.top_logprobs), 0)
            if params.logprobs else None,
            "finish_reason": r.finish_reason,
        }
        obj = "text_completion"
        rid = f"cmpl-{uuid.uuid4().hex}"
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": engine.model_id,
        "system_fingerprint": _fingerprint(engine),
        "choices": [choice],
        "usage": _usage(r),
    }


_DONE = object()


async def stream(engine: Engine, body: dict[str, Any], kind: Kind, *,
                 tenant: str) -> AsyncGenerator[dict[str, Any], None]:
    """Serve one request as OpenAI chunk objects: a role chunk (chat), content deltas, a final
    chunk with ``finish_reason``, and a usage chunk when ``stream_options.include_usage``.

    Validation errors are raised before the first chunk. If the consumer stops early (client
    gone), generation stops at the next token and the request's KV pins are released.
    """
    prompt_ids, params, opts = parse_request(engine, body, kind, tenant=tenant)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    cancelled = threading.Event()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone: nobody is listening any more
            cancelled.set()

    def produce() -> None:
        gen = engine.generate_stream(prompt_ids, params)
        try:
            for ev in gen:
                if cancelled.is_set():
                    break
                put(ev)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, re-raised there
            put(exc)
        finally:
            gen.close()
            put(_DONE)

    worker = threading.Thread(target=produce, name="engine-stream", daemon=True)
    worker.start()
    rid = (f"chatcmpl-{uuid.uuid4().hex}" if kind == "chat" else f"cmpl-{uuid.uuid4().hex}")
    created = int(time.time())
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    usage_field = {"usage": None} if opts["include_usage"] else {}

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": rid, "object": obj, "created": created, "model": engine.model_id,
                "system_fingerprint": _fingerprint(engine), "choices": choices, **usage_field,
                **extra}

    def delta(text: str, ev: TokenEvent | None, finish: str | None) -> dict[str, Any]:
        if kind == "chat":
            c: dict[str, Any] = {"index": 0,
                                 "delta": {"content": text} if text or finish is None else {},
                                 "logprobs": None, "finish_reason": finish}
            if params.logprobs and ev is not None:
                c["logprobs"] = {"content": _chat_logprob_items(engine, [ev.token_id],
                                                                [ev.logprob], [ev.top_logprobs]),
                                 "refusal": None}
        else:
            c = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            if params.logprobs and ev is not None:
                c["logprobs"] = _completion_logprobs(engine, [ev.token_id], [ev.logprob],
                                                     [ev.top_logprobs], 0)
        return c

    started = False
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                if isinstance(item, (AdmissionRefusedError, InvalidParamsError)):
                    raise _run_error(item) from None
                raise item
            if not started:
                started = True
                if kind == "chat":
                    yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}])
            if isinstance(item, TokenEvent):
                if item.text or params.logprobs:
                    yield chunk([delta(item.text, item, None)])
            elif isinstance(item, FinalEvent):
                r = item.result
                if item.text:
                    yield chunk([delta(item.text, None, None)])
                yield chunk([delta("", None, r.finish_reason)])
                if opts["include_usage"]:
                    yield {"id": rid, "object": obj, "created": created, "model": engine.model_id,
                           "system_fingerprint": _fingerprint(engine), "choices": [],
                           "usage": _usage(r)}
    finally:
        cancelled.set()
