"""Parse an OpenAI-style request into its canonical form.

The canonical form is what the key is built from. Its rules:

* every output-affecting field of the API is present with its default made explicit
  (an omitted ``temperature`` is ``1``, not ``0``);
* equivalent spellings fold: a string content and a one-text-part list; ``1`` and ``1.0``;
  ``-0.0`` and ``0.0``; JSON object key order; ``null`` and an omitted optional field;
  ``stop`` as a string, a list, or the same set in another order;
* different meanings never fold: message order, tool order, a different stop set, any change
  inside a text, a different role;
* fields the parser does not know are keyed as given, never dropped (fail closed);
* fields that cannot change the output are listed in :data:`UNKEYED_FIELDS` and reported.

All numbers are normalised the same way: an integral float within 2**53 becomes an int,
``-0.0`` becomes ``0``; NaN and infinities are rejected. ``True`` is never folded with ``1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from keying.errors import InvalidRequestError, RequestTooLargeError

RequestKind = Literal["chat", "completion", "generic"]

#: Fields that cannot change the model's output. They are ignored by the key, and ``explain``
#: lists the ones a request carried. Everything not listed here is keyed.
UNKEYED_FIELDS: frozenset[str] = frozenset(
    {
        "stream",  # transport only; a hit replays as a stream or a body as asked
        "stream_options",  # shape of the stream (usage chunk), not its content
        "user",  # end-user id for abuse tracking; per-user isolation is the *scope*'s job
        "metadata",  # stored-completion tags
        "store",  # whether the provider keeps the completion
        "request_id",
        "timeout",
        "request_timeout",
    }
)

_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1
_EXACT_FLOAT = 2**53


@dataclass(frozen=True, kw_only=True, slots=True)
class KeyLimits:
    """Bounds on what the key builder accepts. Exceeding one is a ``RequestTooLargeError``."""

    max_bytes: int = 8 * 1024 * 1024
    max_depth: int = 64


@dataclass(frozen=True, kw_only=True, slots=True)
class CanonicalRequest:
    """A request reduced to what decides its output."""

    kind: RequestKind
    model: str
    fields: dict[str, Any]
    unkeyed: tuple[str, ...] = field(default=())


class _Budget:
    __slots__ = ("left", "limits")

    def __init__(self, limits: KeyLimits) -> None:
        self.limits = limits
        self.left = limits.max_bytes

    def spend(self, n: int, path: str) -> None:
        self.left -= n
        if self.left < 0:
            raise RequestTooLargeError(
                path,
                f"request exceeds the {self.limits.max_bytes}-byte key limit",
                "send a smaller request or raise the limit",
            )


def canon_number(value: Any, path: str) -> int | float:
    """Fold one JSON number: integral floats become ints, -0.0 becomes 0; reject NaN and inf."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(path, f"expected a number, got {_tname(value)}", "send a number")
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise InvalidRequestError(path, "integer out of range", "use a 64-bit integer")
        return value
    if math.isnan(value) or math.isinf(value):
        raise InvalidRequestError(path, f"{value} is not a finite number", "send a finite number")
    if value.is_integer() and abs(value) <= _EXACT_FLOAT:
        return int(value)
    return value


def canon_value(value: Any, path: str, budget: _Budget, depth: int = 0) -> Any:
    """Canonicalise any JSON value: sorted maps, folded numbers, validated types and sizes."""
    if depth > budget.limits.max_depth:
        raise RequestTooLargeError(
            path, f"nested deeper than {budget.limits.max_depth} levels", "flatten the value"
        )
    if value is None or isinstance(value, bool):
        budget.spend(1, path)
        return value
    if isinstance(value, str):
        budget.spend(len(value) + 1, path)
        return value
    if isinstance(value, (int, float)):
        budget.spend(9, path)
        return canon_number(value, path)
    if isinstance(value, Mapping):
        out = {}
        for k in sorted(value, key=_key_order(path)):
            budget.spend(len(k) + 1, path)
            out[k] = canon_value(value[k], f"{path}.{k}", budget, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        budget.spend(1, path)
        return [canon_value(v, f"{path}[{i}]", budget, depth + 1) for i, v in enumerate(value)]
    raise InvalidRequestError(path, f"unsupported type {_tname(value)}", "send JSON values only")


def _key_order(path: str) -> Callable[[Any], str]:
    def order(k: Any) -> str:
        if not isinstance(k, str):
            raise InvalidRequestError(path, "object keys must be strings", "use string keys")
        return k

    return order


def _tname(v: Any) -> str:
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
        type(None): "null",
    }.get(type(v), type(v).__name__)


# --- field normalisers -------------------------------------------------------------------------

Normaliser = Callable[[Any, str, _Budget], Any]


def _number_in(lo: float, hi: float) -> Normaliser:
    def norm(v: Any, path: str, budget: _Budget) -> int | float:
        n = canon_number(v, path)
        if not lo <= n <= hi:
            raise InvalidRequestError(path, f"{n} is out of range", f"use a value in [{lo}, {hi}]")
        return n

    return norm


def _int_in(lo: int, hi: int | None, *, nullable: bool = False) -> Normaliser:
    def norm(v: Any, path: str, budget: _Budget) -> int | None:
        if v is None and nullable:
            return None
        n = canon_number(v, path)
        if not isinstance(n, int):
            raise InvalidRequestError(path, f"expected an integer, got {v!r}", "send an integer")
        if n < lo or (hi is not None and n > hi):
            bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise InvalidRequestError(path, f"{n} is out of range", f"use an integer {bound}")
        return n

    return norm


def _bool(v: Any, path: str, budget: _Budget) -> bool:
    if not isinstance(v, bool):
        raise InvalidRequestError(path, f"expected a boolean, got {_tname(v)}", "send true/false")
    return v


def _opt_str(v: Any, path: str, budget: _Budget) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str):
        raise InvalidRequestError(path, f"expected a string, got {_tname(v)}", "send a string")
    budget.spend(len(v), path)
    return v


def _any(v: Any, path: str, budget: _Budget) -> Any:
    return canon_value(v, path, budget, 1)


def _stop(v: Any, path: str, budget: _Budget) -> list[str]:
    # NOTE: stop sequences act as a set (generation halts at whichever appears first), so order
    # and duplicates fold; a different set never does.
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list):
        raise InvalidRequestError(path, f"expected a string or an array, got {_tname(v)}",
                                  "send a string or an array of strings")
    for i, s in enumerate(v):
        if not isinstance(s, str):
            raise InvalidRequestError(f"{path}[{i}]", f"expected a string, got {_tname(s)}",
                                      "send stop sequences as strings")
        budget.spend(len(s) + 1, path)
    return sorted(set(v))


def _logit_bias(v: Any, path: str, budget: _Budget) -> dict[str, int | float]:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise InvalidRequestError(path, f"expected an object, got {_tname(v)}",
                                  "map token ids to biases")
    out: dict[str, int | float] = {}
    for k in sorted(v, key=_key_order(path)):
        key = k.strip()
        if not key.lstrip("-").isdigit():
            raise InvalidRequestError(f"{path}.{k}", "logit_bias keys are token ids",
                                      "use integer token ids as keys")
        norm_key = str(int(key))
        if norm_key in out:
            raise InvalidRequestError(f"{path}.{k}", "token id given twice", "give each id once")
        out[norm_key] = _number_in(-100, 100)(v[k], f"{path}.{k}", budget)
    return dict(sorted(out.items()))


def _tools(v: Any, path: str, budget: _Budget) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise InvalidRequestError(path, f"expected an array, got {_tname(v)}",
                                  "send tools as an array")
    out = []
    for i, tool in enumerate(v):
        p = f"{path}[{i}]"
        if not isinstance(tool, Mapping):
            raise InvalidRequestError(p, f"expected an object, got {_tname(tool)}",
                                      "send each tool as an object")
        t = canon_value(tool, p, budget, 1)
        fn = t.get("function")
        if t.get("type") == "function" and isinstance(fn, dict):
            # `strict` defaults to false: an omitted flag and an explicit false are the same tool.
            fn.setdefault("strict", False)
            if fn["strict"] is None:
                fn["strict"] = False
            t["function"] = dict(sorted(fn.items()))
        out.append(t)
    return out


def _response_format(v: Any, path: str, budget: _Budget) -> Any:
    if v is None:
        return {"type": "text"}
    if not isinstance(v, Mapping):
        raise InvalidRequestError(path, f"expected an object, got {_tname(v)}",
                                  'send {"type": "text"}, json_object or json_schema')
    return canon_value(v, path, budget, 1)


def _content_part(part: Any, path: str, budget: _Budget) -> Any:
    if not isinstance(part, Mapping):
        raise InvalidRequestError(path, f"expected a content part object, got {_tname(part)}",
                                  'send {"type": "text", "text": ...} or another part type')
    if not isinstance(part.get("type"), str):
        raise InvalidRequestError(f"{path}.type", "a content part needs a string type",
                                  'set "type" to text, image_url, input_audio or file')
    p = canon_value(part, path, budget, 2)
    if p["type"] == "text" and not isinstance(p.get("text"), str):
        raise InvalidRequestError(f"{path}.text", "a text part needs a string text",
                                  "send the text as a string")
    if p["type"] == "image_url":
        img = p.get("image_url")
        if isinstance(img, str):
            img = {"url": img}
        if not isinstance(img, dict) or not isinstance(img.get("url"), str):
            raise InvalidRequestError(f"{path}.image_url", "an image part needs a url",
                                      'send {"image_url": {"url": ...}}')
        img.setdefault("detail", "auto")
        if img["detail"] is None:
            img["detail"] = "auto"
        p["image_url"] = dict(sorted(img.items()))
    return p


def _content(v: Any, path: str, budget: _Budget) -> Any:
    if v is None or isinstance(v, str):
        if v is not None:
            budget.spend(len(v), path)
        return v
    if not isinstance(v, list):
        raise InvalidRequestError(path, f"expected a string, an array of parts or null, "
                                  f"got {_tname(v)}", "send content as a string or parts")
    parts = [_content_part(p, f"{path}[{i}]", budget) for i, p in enumerate(v)]
    if len(parts) == 1 and parts[0].keys() == {"type", "text"} and parts[0]["type"] == "text":
        # NOTE: a one-text-part list is the same prompt as the bare string; several text parts
        # are not folded (providers differ in how they join them).
        return parts[0]["text"]
    return parts


def _messages(v: Any, path: str, budget: _Budget) -> list[dict[str, Any]]:
    if not isinstance(v, list):
        raise InvalidRequestError(path, f"expected an array, got {_tname(v)}",
                                  "send messages as an array of {role, content} objects")
    if not v:
        raise InvalidRequestError(path, "no messages", "send at least one message")
    out = []
    for i, m in enumerate(v):
        p = f"{path}[{i}]"
        if not isinstance(m, Mapping):
            raise InvalidRequestError(p, f"expected an object, got {_tname(m)}",
                                      "send each message as {role, content}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequestError(f"{p}.role", "missing or non-string role",
                                      "set role to system, developer, user, assistant or tool")
        msg: dict[str, Any] = {}
        for k in m:
            if k == "content":
                continue
            if not isinstance(k, str):
                raise InvalidRequestError(p, "object keys must be strings", "use string keys")
            budget.spend(len(k) + 1, p)
            msg[k] = canon_value(m[k], f"{p}.{k}", budget, 2)
        msg["content"] = _content(m.get("content"), f"{p}.content", budget)
        for optional in ("tool_calls", "name"):
            # An absent optional and an explicit null/empty say the same thing.
            if optional in msg and msg[optional] in (None, []):
                del msg[optional]
        out.append(dict(sorted(msg.items())))
    return out


def _prompt(v: Any, path: str, budget: _Budget) -> Any:
    if isinstance(v, str):
        budget.spend(len(v), path)
        return v
    if not isinstance(v, list) or not v:
        raise InvalidRequestError(path, f"expected a string or a non-empty array, got {_tname(v)}",
                                  "send a string, strings, token ids or arrays of token ids")
    if all(isinstance(x, str) for x in v):
        budget.spend(sum(len(x) + 1 for x in v), path)
        return v[0] if len(v) == 1 else list(v)
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        ids = [canon_number(x, f"{path}[{i}]") for i, x in enumerate(v)]
        for i, x in enumerate(ids):
            if not isinstance(x, int) or x < 0:
                raise InvalidRequestError(f"{path}[{i}]", f"{x!r} is not a token id",
                                          "send non-negative integer token ids")
        budget.spend(9 * len(ids), path)
        return ids
    if all(isinstance(x, list) for x in v):
        rows = [_prompt(x, f"{path}[{i}]", budget) for i, x in enumerate(v)]
        if any(not isinstance(r, list) for r in rows):
            raise InvalidRequestError(path, "nested prompts must be arrays of token ids",
                                      "send [[id, ...], ...]")
        return rows[0] if len(rows) == 1 else rows
    raise InvalidRequestError(path, "mixed prompt array", "send only strings or only token ids")


def _tool_choice_default(fields: dict[str, Any]) -> str:
    return "auto" if fields.get("tools") else "none"


@dataclass(frozen=True, slots=True)
class _Spec:
    default: Any
    norm: Normaliser


_PENALTY = _number_in(-2, 2)

CHAT_FIELDS: dict[str, _Spec] = {
    "messages": _Spec(None, _messages),
    "temperature": _Spec(1, _number_in(0, 2)),
    "top_p": _Spec(1, _number_in(0, 1)),
    "n": _Spec(1, _int_in(1, 128)),
    "max_tokens": _Spec(None, _int_in(1, None, nullable=True)),
    "max_completion_tokens": _Spec(None, _int_in(1, None, nullable=True)),
    "seed": _Spec(None, _int_in(_INT_MIN, _INT_MAX, nullable=True)),
    "stop": _Spec(None, _stop),
    "frequency_penalty": _Spec(0, _PENALTY),
    "presence_penalty": _Spec(0, _PENALTY),
    "logit_bias": _Spec(None, _logit_bias),
    "logprobs": _Spec(False, lambda v, p, b: False if v is None else _bool(v, p, b)),
    "top_logprobs": _Spec(None, _int_in(0, 20, nullable=True)),
    "tools": _Spec(None, _tools),
    "tool_choice": _Spec(None, _any),  # default depends on tools; filled in below
    "parallel_tool_calls": _Spec(True, lambda v, p, b: True if v is None else _bool(v, p, b)),
    "response_format": _Spec(None, _response_format),
    "reasoning_effort": _Spec(None, _opt_str),
    "service_tier": _Spec(None, _opt_str),
}

COMPLETION_FIELDS: dict[str, _Spec] = {
    "prompt": _Spec(None, _prompt),
    "temperature": _Spec(1, _number_in(0, 2)),
    "top_p": _Spec(1, _number_in(0, 1)),
    "n": _Spec(1, _int_in(1, 128)),
    "best_of": _Spec(1, _int_in(1, 20)),
    "max_tokens": _Spec(16, _int_in(0, None)),
    "seed": _Spec(None, _int_in(_INT_MIN, _INT_MAX, nullable=True)),
    "stop": _Spec(None, _stop),
    "frequency_penalty": _Spec(0, _PENALTY),
    "presence_penalty": _Spec(0, _PENALTY),
    "logit_bias": _Spec(None, _logit_bias),
    "logprobs": _Spec(None, _int_in(0, 5, nullable=True)),
    "echo": _Spec(False, lambda v, p, b: False if v is None else _bool(v, p, b)),
    "suffix": _Spec(None, _opt_str),
}

_REQUIRED = {"chat": "messages", "completion": "prompt"}


def detect_kind(body: Mapping[str, Any]) -> RequestKind:
    """Guess the request kind from its shape: ``messages`` is chat, ``prompt`` a completion."""
    if "messages" in body:
        return "chat"
    if "prompt" in body:
        return "completion"
    return "generic"


def canonicalize(
    body: Any,
    kind: RequestKind | None = None,
    limits: KeyLimits | None = None,
) -> CanonicalRequest:
    """Reduce ``body`` (a parsed JSON request) to its canonical form, validating as it goes."""
    if not isinstance(body, Mapping):
        raise InvalidRequestError("request", f"expected a JSON object, got {_tname(body)}",
                                  "send the request body as an object")
    budget = _Budget(limits or KeyLimits())
    kind = kind or detect_kind(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("model", "missing or not a non-empty string",
                                  'set "model" to the model id')
    specs = CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS if kind == "completion" else {}
    required = _REQUIRED.get(kind)
    if required is not None and body.get(required) is None:
        raise InvalidRequestError(required, "missing", f'send "{required}"')

    fields: dict[str, Any] = {}
    unkeyed: list[str] = []
    for name, value in body.items():
        if not isinstance(name, str):
            raise InvalidRequestError("request", "object keys must be strings", "use string keys")
        if name == "model":
            continue
        if name in UNKEYED_FIELDS:
            unkeyed.append(name)
            continue
        budget.spend(len(name) + 1, name)
        spec = specs.get(name)
        if spec is None:
            # Unknown to us: keyed exactly as given (canonical JSON). Fail closed.
            fields[name] = canon_value(value, name, budget, 1)
        elif value is None:
            fields[name] = spec.norm(spec.default, name, budget) if spec.default is not None \
                else _null_default(name, spec, budget)
        else:
            fields[name] = spec.norm(value, name, budget)
    for name, spec in specs.items():
        if name not in fields:
            fields[name] = _null_default(name, spec, budget) if spec.default is None \
                else spec.norm(spec.default, name, budget)
    if kind == "chat" and fields.get("tool_choice") is None:
        fields["tool_choice"] = _tool_choice_default(fields)
    return CanonicalRequest(
        kind=kind, model=model, fields=dict(sorted(fields.items())), unkeyed=tuple(sorted(unkeyed))
    )


def _null_default(name: str, spec: _Spec, budget: _Budget) -> Any:
    # Normalisers that fold null into a value (stop -> [], tools -> [], ...) do so here;
    # the rest keep null as the explicit "not set".
    try:
        return spec.norm(None, name, budget)
    except InvalidRequestError:
        return None
