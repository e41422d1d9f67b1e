"""Read an OpenAI request for the reference engine, as ``keying.fields`` decides.

A field of no row for the request's kind is refused with a 400 (unknown or misspelt); a
:class:`~keying.fields.NoopOnly` field is refused with a 422 unless it holds a no-op value,
never silently ignored: a cache keyed on it must not be handed an answer that ignored it; an
:class:`~keying.fields.Ignored` field is accepted; the :class:`~keying.fields.Honoured` and
:class:`~keying.fields.Transport` fields are read below, with the table's ranges (or the
narrower one the row gives the engine) and defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from gpu_prefix.engine import Engine, GenerationParams
from gpu_prefix.errors import InvalidParamsError
from keying.fields import (
    Honoured,
    Keyed,
    NoopOnly,
    ReadField,
    Transport,
    Unkeyed,
    field,
    read_unkeyed,
)

Kind = Literal["chat", "completion"]

#: The engine's own cap on a chat answer when the request sets none (the keyed default is
#: null, "no cap": a chat request without max_tokens keys the same whatever the cap).
DEFAULT_CHAT_MAX_TOKENS = 128


class EngineRequestError(ValueError):
    """A request the engine cannot serve as sent. ``status`` is the HTTP status (400/404/422),
    ``field`` the offending field, and the message says how to fix it."""

    def __init__(self, message: str, *, status: int = 400, field: str | None = None) -> None:
        self.status = status
        self.field = field
        self.message = message
        super().__init__(message)


def _bad(field: str, message: str, *, status: int = 400) -> EngineRequestError:
    return EngineRequestError(f"{field}: {message}", status=status, field=field)


def _keyed(kind: Kind, name: str) -> Keyed:
    row = field(kind, name)
    spec = row.keying(kind) if row is not None else None
    if not isinstance(spec, Keyed):
        raise RuntimeError(f"the field table has no keyed {kind} field {name!r}")
    return spec


def _bounds(kind: Kind, name: str) -> tuple[int, int | None]:
    """The range the engine implements: the row's own for the engine, else the keyed one."""
    row = field(kind, name)
    if row is not None and isinstance(row.engine, Honoured) and row.engine.range is not None:
        return row.engine.range
    spec = _keyed(kind, name)
    assert spec.lo is not None, f"{name} has no lower bound in the field table"
    return spec.lo, spec.hi


#: A completion's length when the request sets none: the keyed default (OpenAI's documented 16).
DEFAULT_COMPLETION_MAX_TOKENS: int = _keyed("completion", "max_tokens").default


def _number(body: Mapping[str, Any], kind: Kind, name: str) -> float:
    v = body.get(name)
    if v is None:
        return float(_keyed(kind, name).default)
    lo, hi = (float(b) if b is not None else None for b in _bounds(kind, name))
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(name, f"must be a number, got {type(v).__name__}; "
                   f"send a number in [{lo}, {hi}]")
    if v < lo or (hi is not None and v > hi):  # type: ignore[operator]
        raise _bad(name, f"{v} is outside [{lo}, {hi}]; send a value in that range")
    return float(v)


def _int(body: Mapping[str, Any], kind: Kind, name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    lo, hi = _bounds(kind, name)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, f"must be an integer, got {type(v).__name__}")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise _bad(name, f"{v} must be {rng}")
    return v


def check_fields(body: Mapping[str, Any], kind: Kind) -> None:
    """Refuse every field the table gives the engine no way to honour, naming it."""
    for k, v in body.items():
        row = field(kind, k)
        if row is None:
            raise _bad(k, "is not a recognised field for this endpoint; "
                       "remove it or check its spelling")
        if isinstance(row.engine, NoopOnly) and v not in row.engine.noop:
            raise _bad(k, "is not supported by the reference engine; remove it", status=422)


def _check_model(engine: Engine, body: Mapping[str, Any]) -> None:
    model = body.get("model")
    if model is not None and model != engine.model_id:
        raise EngineRequestError(f"model: {model!r} is not served here; use {engine.model_id!r}",
                                 status=404, field="model")


def _check_one_choice(body: Mapping[str, Any], kind: Kind) -> None:
    n = _int(body, kind, "n")
    if n not in (None, 1):
        raise _bad("n", f"only n=1 is supported, got {n}; send one request per choice", status=422)


@dataclass(frozen=True, slots=True)
class _Sampling:
    temperature: float
    top_p: float
    seed: int | None


def _sampling(body: Mapping[str, Any], kind: Kind) -> _Sampling:
    temperature = _number(body, kind, "temperature")
    top_p = _number(body, kind, "top_p")
    if top_p == 0.0:
        raise _bad("top_p", "0 keeps no token; use a value in (0, 1]")
    return _Sampling(temperature=temperature, top_p=top_p, seed=_int(body, kind, "seed"))


def _max_tokens(body: Mapping[str, Any], kind: Kind) -> int | None:
    """The length asked for, or None for the engine's default."""
    max_tokens = _int(body, kind, "max_tokens")
    if kind != "chat":
        return max_tokens
    mct = _int(body, kind, "max_completion_tokens")
    if mct is not None and max_tokens is not None and mct != max_tokens:
        raise _bad("max_completion_tokens", "differs from max_tokens; send only one of them")
    return mct if mct is not None else max_tokens


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    raw = body.get("stop")
    if raw is None:
        return ()
    if isinstance(raw, str):
        return (raw,) if raw else ()
    if isinstance(raw, list) and all(isinstance(s, str) and s for s in raw) and len(raw) <= 4:
        return tuple(raw)
    raise _bad("stop", "must be a string or a list of up to 4 non-empty strings")


def _logprobs(body: Mapping[str, Any], kind: Kind) -> tuple[bool, int]:
    """Whether to return log-probabilities, and how many alternatives per token."""
    lp = body.get("logprobs")
    if kind == "chat":
        if lp is not None and not isinstance(lp, bool):
            raise _bad("logprobs", "must be true or false for chat completions")
        top = _int(body, kind, "top_logprobs") or 0
        if top and not lp:
            raise _bad("top_logprobs", "needs logprobs: true")
        return bool(lp), top
    if lp is None:
        return False, 0
    n = _int(body, kind, "logprobs")
    return n is not None, n or 0


def _transport_read(kind: Kind) -> tuple[ReadField, ...]:
    """``kind``'s delivery fields (engine decision :class:`Transport`) with a type rule: the
    rows of :func:`keying.fields.read_unkeyed` the engine reads, in table order."""
    return tuple(f for f in read_unkeyed()
                 if (row := field(kind, f.name)) is not None
                 and isinstance(row.engine, Transport) and isinstance(row.keying(kind), Unkeyed))


#: Per kind, the delivery fields whose type is checked (the table never changes at run time).
_TRANSPORT_READ: dict[Kind, tuple[ReadField, ...]] = {
    "chat": _transport_read("chat"), "completion": _transport_read("completion")}


def _delivery(body: Mapping[str, Any], kind: Kind) -> dict[str, Any]:
    """The response options (stream, usage chunk), from the fields that shape only delivery."""
    for f in _TRANSPORT_READ[kind]:
        v = body.get(f.name)
        if v is not None and not isinstance(v, f.pytype):
            raise _bad(f.name, f"{f.problem}; {f.fix}")
    so = body.get("stream_options")
    return {"stream": bool(body.get("stream")),
            "include_usage": bool(so and so.get("include_usage"))}


def _prompt_ids(engine: Engine, body: Mapping[str, Any], kind: Kind) -> list[int]:
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("messages", "is required: a non-empty list of {role, content}")
        ids = engine.chat_prompt_ids(messages)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise _bad("prompt", "must not be empty")
            ids = engine.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise _bad("prompt", "must be a non-empty string or a list of token ids "
                       "(one prompt per request)")
    if not ids:
        raise _bad("prompt", "encodes to no tokens; send some text")
    return ids


def _fit(engine: Engine, kind: Kind, n_prompt: int, max_tokens: int | None) -> int:
    """The length to generate: as asked, or the default, within the model's context."""
    room = engine.max_context - n_prompt
    if room < 1:
        raise _bad("messages" if kind == "chat" else "prompt",
                   f"{n_prompt} tokens fill the model's context of {engine.max_context}; "
                   "shorten it")
    if max_tokens is None:
        default = DEFAULT_CHAT_MAX_TOKENS if kind == "chat" else DEFAULT_COMPLETION_MAX_TOKENS
        return min(default, room)
    if max_tokens > room:
        raise _bad("max_tokens", f"{max_tokens} + {n_prompt} prompt tokens exceed the context of "
                   f"{engine.max_context}; ask for at most {room}")
    return max_tokens


def parse_request(
    engine: Engine, body: Any, kind: Kind, *, tenant: str
) -> tuple[list[int], GenerationParams, dict[str, Any]]:
    """Validate an OpenAI body; return prompt ids, generation params and response options.

    The checks run in a fixed order, so a request with several faults is told of the same one.
    """
    if kind not in ("chat", "completion"):
        raise _bad("kind", f"unknown kind {kind!r}; use chat or completion")
    if not isinstance(body, Mapping):
        raise _bad("body", "must be a JSON object")
    check_fields(body, kind)
    _check_model(engine, body)
    _check_one_choice(body, kind)
    sampling = _sampling(body, kind)
    max_tokens = _max_tokens(body, kind)
    stop = _stop(body)
    want_logprobs, top_logprobs = _logprobs(body, kind)
    options = _delivery(body, kind)
    try:
        prompt_ids = _prompt_ids(engine, body, kind)
        params = GenerationParams(
            max_tokens=_fit(engine, kind, len(prompt_ids), max_tokens),
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            stop=stop,
            logprobs=want_logprobs,
            top_logprobs=top_logprobs,
            scope_salt=engine.scope_salt_for(tenant),
        )
    except InvalidParamsError as exc:
        raise EngineRequestError(str(exc), status=400, field=exc.field) from None
    return prompt_ids, params, options
