"""OpenAI-compatible translation for the reference engine, as plain async functions.

The cache service calls these in process (no HTTP); ``cachesvc.engine_app`` serves them over
HTTP. The engine runs in a worker thread so the event loop never blocks on the model.

Fields that would change the output and that the engine does not implement (tools,
response_format, penalties, logit_bias, n > 1, ...) are refused with a 4xx naming the field,
never silently ignored: a cache keyed on them must not be handed an answer that ignored them.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Mapping
from typing import Any, Literal

from gpu_prefix.engine import Engine, FinalEvent, GenerationParams, GenerationResult, TokenEvent
from gpu_prefix.errors import AdmissionRefusedError, InvalidParamsError

Kind = Literal["chat", "completion"]

#: Fields accepted and ignored because they cannot change the output.
_IGNORED = frozenset(
    {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier"}
)
_COMMON = frozenset(
    {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options", "logprobs"}
)
_ALLOWED = {
    "chat": _COMMON | {"messages", "max_completion_tokens", "top_logprobs"},
    "completion": _COMMON | {"prompt"},
}
#: Output-changing fields we refuse unless they hold their no-op value.
_NOOP_VALUES: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "modalities": (None, ["text"]),
    "reasoning_effort": (None,),
    "audio": (None,),
    "prediction": (None,),
}

DEFAULT_CHAT_MAX_TOKENS = 128
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions


class EngineRequestError(ValueError):
    """A request the engine cannot serve as sent. ``status`` is the HTTP status (400/404/422),
    ``field`` the offending field, and the message says how to fix it."""

    def __init__(self, message: str, *, status: int = 400, field: str | None = None) -> None:
        self.status = status
        self.field = field
        self.message = message
        super().__init__(message)


class EngineOverloadedError(EngineRequestError):
    """The engine's KV pool is full and its queue too: retry after ``retry_after_s`` (503)."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message, status=503, field=None)


def _bad(field: str, message: str, *, status: int = 400) -> EngineRequestError:
    return EngineRequestError(f"{field}: {message}", status=status, field=field)


def _number(body: Mapping[str, Any], field: str, default: float, lo: float, hi: float) -> float:
    v = body.get(field)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(field, f"must be a number, got {type(v).__name__}; send a number in [{lo}, {hi}]")
    if not lo <= v <= hi:
        raise _bad(field, f"{v} is outside [{lo}, {hi}]; send a value in that range")
    return float(v)


def _int(body: Mapping[str, Any], field: str, lo: int, hi: int | None = None) -> int | None:
    v = body.get(field)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(field, f"must be an integer, got {type(v).__name__}")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise _bad(field, f"{v} must be {rng}")
    return v


def parse_request(engine: Engine, body: Any, kind: Kind, *, tenant: str) -> tuple[list[int], GenerationParams, dict[str, Any]]:
    """Validate an OpenAI body; return prompt ids, generation params and response options."""
    if kind not in ("chat", "completion"):
        raise _bad("kind", f"unknown kind {kind!r}; use chat or completion")
    if not isinstance(body, Mapping):
        raise _bad("body", "must be a JSON object")
    for k, v in body.items():
        if k in _ALLOWED[kind] or k in _IGNORED:
            continue
        if k in _NOOP_VALUES:
            if v in _NOOP_VALUES[k]:
                continue
            raise _bad(k, "is not supported by the reference engine; remove it", status=422)
        raise _bad(k, "is not a recognised field for this endpoint; remove it or check its spelling")
    model = body.get("model")
    if model is not None and model != engine.model_id:
        raise EngineRequestError(
            f"model: {model!r} is not served here; use {engine.model_id!r}", status=404, field="model"
        )
    n = _int(body, "n", 1)
    if n not in (None, 1):
        raise _bad("n", f"only n=1 is supported, got {n}; send one request per choice", status=422)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise _bad("top_p", "0 keeps no token; use a value in (0, 1]")
    seed = _int(body, "seed", -(2**63), 2**63 - 1)
    max_tokens = _int(body, "max_tokens", 1)
    if kind == "chat":
        mct = _int(body, "max_completion_tokens", 1)
        if mct is not None and max_tokens is not None and mct != max_tokens:
            raise _bad("max_completion_tokens", "differs from max_tokens; send only one of them")
        max_tokens = mct if mct is not None else max_tokens
    stop_raw = body.get("stop")
    if stop_raw is None:
        stop: tuple[str, ...] = ()
    elif isinstance(stop_raw, str):
        stop = (stop_raw,) if stop_raw else ()
    elif isinstance(stop_raw, list) and all(isinstance(s, str) and s for s in stop_raw) and len(stop_raw) <= 4:
        stop = tuple(stop_raw)
    else:
        raise _bad("stop", "must be a string or a list of up to 4 non-empty strings")
    top_logprobs = 0
    want_logprobs = False
    lp = body.get("logprobs")
    if kind == "chat":
        if lp is not None and not isinstance(lp, bool):
            raise _bad("logprobs", "must be true or false for chat completions")
        want_logprobs = bool(lp)
        top_logprobs = _int(body, "top_logprobs", 0, 20) or 0
        if top_logprobs and not want_logprobs:
            raise _bad("top_logprobs", "needs logprobs: true")
    elif lp is not None:
        lp_int = _int(body, "logprobs", 0, 5)
        want_logprobs = lp_int is not None
        top_logprobs = lp_int or 0
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream", "must be true or false")
    so = body.get("stream_options")
    include_usage = False
    if so is not None:
        if not isinstance(so, Mapping):
            raise _bad("stream_options", "must be an object like {\"include_usage\": true}")
        include_usage = bool(so.get("include_usage"))
    try:
        if kind == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _bad("messages", "is required: a non-empty list of {role, content}")
            prompt_ids = engine.chat_prompt_ids(messages)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, str):
                if not prompt:
                    raise _bad("prompt", "must not be empty")
                prompt_ids = engine.encode(prompt)
            elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                prompt_ids = list(prompt)
            else:
                raise _bad("prompt", "must be a non-empty string or a list of token ids (one prompt per request)")
        if not prompt_ids:
            raise _bad("prompt", "encodes to no tokens; send some text")
        room = engine.max_context - len(prompt_ids)
        if room < 1:
            raise _bad("messages" if kind == "chat" else "prompt",
                       f"{len(prompt_ids)} tokens fill the model's context of {engine.max_context}; shorten it")
        if max_tokens is None:
            max_tokens = min(DEFAULT_CHAT_MAX_TOKENS if kind == "chat" else DEFAULT_COMPLETION_MAX_TOKENS, room)
        elif max_tokens > room:
            raise _bad("max_tokens", f"{max_tokens} + {len(prompt_ids)} prompt tokens exceed the context of "
                       f"{engine.max_context}; ask for at most {room}")
        params = GenerationParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            logprobs=want_logprobs,
            top_logprobs=top_logprobs,
            scope_salt=engine.scope_salt_for(tenant),
        )
    except InvalidParamsError as exc:
        raise EngineRequestError(str(exc), status=400, field=exc.field) from None
    return prompt_ids, params, {"stream": bool(stream), "include_usage": include_usage}


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


def _chat_logprob_items(engine: Engine, ids: list[int], lps: list[float], tops: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    items = []
    for tid, lp, top in zip(ids, lps, tops, strict=True):
        s = _token_str(engine, tid)
        items.append({
            "token": s, "logprob": lp, "bytes": list(s.encode("utf-8")),
            "top_logprobs": [
                {"token": (t := _token_str(engine, i)), "logprob": v, "bytes": list(t.encode("utf-8"))} for i, v in top
            ],
        })
    return items


def _completion_logprobs(engine: Engine, ids: list[int], lps: list[float], tops: list[tuple[Any, ...]], offset: int) -> dict[str, Any]:
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


async def complete(engine: Engine, body: dict[str, Any], kind: Kind, *, tenant: str) -> dict[str, Any]:
    """Serve one non-streaming request (:func:`complete_blocking` in a thread of its own);
    returns an OpenAI response object."""
    result: dict[str, Any] = await _in_thread(
        functools.partial(complete_blocking, engine, body, kind, tenant=tenant))
    return result


def complete_blocking(engine: Engine, body: dict[str, Any], kind: Kind, *, tenant: str) -> dict[str, Any]:
    """One non-streaming request in the calling thread: :func:`complete` runs it in a thread of
    its own; the auditor's worker calls it directly, so its CPU time counts the model's work."""
    prompt_ids, params, _ = parse_request(engine, body, kind, tenant=tenant)
    try:
        r = engine.generate(prompt_ids, params)
    except (AdmissionRefusedError, InvalidParamsError) as exc:
        raise _run_error(exc) from None
    return _response(engine, kind, params, r)


def _response(engine: Engine, kind: Kind, params: GenerationParams, r: GenerationResult) -> dict[str, Any]:
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
                "content": _chat_logprob_items(engine, list(r.token_ids), list(r.logprobs), list(r.top_logprobs)),
                "refusal": None,
            }
        obj = "chat.completion"
        rid = f"chatcmpl-{uuid.uuid4().hex}"
    else:
        choice = {
            "index": 0,
            "text": r.text,
            "logprobs": _completion_logprobs(engine, list(r.token_ids), list(r.logprobs), list(r.top_logprobs), 0)
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


async def stream(engine: Engine, body: dict[str, Any], kind: Kind, *, tenant: str) -> AsyncGenerator[dict[str, Any], None]:
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
                "system_fingerprint": _fingerprint(engine), "choices": choices, **usage_field, **extra}

    def delta(text: str, ev: TokenEvent | None, finish: str | None) -> dict[str, Any]:
        if kind == "chat":
            c: dict[str, Any] = {"index": 0, "delta": {"content": text} if text or finish is None else {},
                                 "logprobs": None, "finish_reason": finish}
            if params.logprobs and ev is not None:
                c["logprobs"] = {"content": _chat_logprob_items(engine, [ev.token_id], [ev.logprob], [ev.top_logprobs]),
                                 "refusal": None}
        else:
            c = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            if params.logprobs and ev is not None:
                c["logprobs"] = _completion_logprobs(engine, [ev.token_id], [ev.logprob], [ev.top_logprobs], 0)
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
                           "system_fingerprint": _fingerprint(engine), "choices": [], "usage": _usage(r)}
    finally:
        cancelled.set()
