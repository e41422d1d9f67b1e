"""Hypothesis strategies for requests, equivalent respellings and single-field mutations.

Exported so that users can fuzz their own gateway's key usage: a respelling must key the same,
a mutation must key differently. ``hypothesis`` is only needed when this module is imported.

    from hypothesis import given
    from keying.strategies import chat_requests, respelled, mutated

    @given(chat_requests().flatmap(lambda r: st.tuples(st.just(r), respelled(r))))
    def test_my_gateway_keys_respellings_alike(pair): ...
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

from keying.canonical import UNKEYED_FIELDS

Request = dict[str, Any]

_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=0, max_size=40
)
_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10)
_json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    _text,
)
json_values = st.recursive(
    _json_scalar,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(_name, children, max_size=4)
    ),
    max_leaves=10,
)


def _message() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "developer"]), "content": _text}
    )


def _tool() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "type": st.just("function"),
            "function": st.fixed_dictionaries(
                {
                    "name": _name,
                    "description": _text,
                    "parameters": st.fixed_dictionaries(
                        {
                            "type": st.just("object"),
                            "properties": st.dictionaries(
                                _name,
                                st.fixed_dictionaries({"type": st.sampled_from(
                                    ["string", "integer", "number", "boolean"])}),
                                max_size=3,
                            ),
                        }
                    ),
                }
            ),
        }
    )


_OPTIONAL_CHAT: dict[str, st.SearchStrategy[Any]] = {
    "temperature": st.one_of(st.just(0), st.floats(0, 2, allow_nan=False)),
    "top_p": st.floats(0, 1, allow_nan=False),
    "max_tokens": st.integers(1, 4096),
    "max_completion_tokens": st.integers(1, 4096),
    "seed": st.integers(-(2**31), 2**31),
    "stop": st.one_of(_text, st.lists(_text, max_size=4)),
    "frequency_penalty": st.floats(-2, 2, allow_nan=False),
    "presence_penalty": st.floats(-2, 2, allow_nan=False),
    "n": st.integers(1, 4),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 20),
    "tools": st.lists(_tool(), max_size=3),
    "tool_choice": st.sampled_from(["auto", "none", "required"]),
    "parallel_tool_calls": st.booleans(),
    "reasoning_effort": st.sampled_from(["low", "medium", "high"]),
    "response_format": st.sampled_from(
        [{"type": "text"}, {"type": "json_object"}]
    ),
    "logit_bias": st.dictionaries(
        st.integers(0, 50000).map(str), st.integers(-100, 100), max_size=3
    ),
}

_OPTIONAL_COMPLETION: dict[str, st.SearchStrategy[Any]] = {
    "temperature": st.one_of(st.just(0), st.floats(0, 2, allow_nan=False)),
    "top_p": st.floats(0, 1, allow_nan=False),
    "max_tokens": st.integers(0, 4096),
    "seed": st.integers(-(2**31), 2**31),
    "stop": st.one_of(_text, st.lists(_text, max_size=4)),
    "n": st.integers(1, 4),
    "best_of": st.integers(1, 4),
    "logprobs": st.integers(0, 5),
    "echo": st.booleans(),
    "suffix": _text,
}

#: Names no OpenAI-style API defines; used to exercise "unknown fields are keyed".
_unknown_name = _name.map(lambda s: f"x_{s}").filter(lambda s: s not in UNKEYED_FIELDS)


def chat_requests(*, model: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[Request]:
    """Valid chat completion requests, with a random subset of optional and unknown fields."""
    return st.builds(
        _assemble,
        st.fixed_dictionaries(
            {
                "model": model if model is not None else st.sampled_from(["m-a", "m-b", "gpt-x"]),
                "messages": st.lists(_message(), min_size=1, max_size=4),
            },
            optional=_OPTIONAL_CHAT,
        ),
        st.dictionaries(_unknown_name, json_values, max_size=2),
    )


def completion_requests(
    *, model: st.SearchStrategy[str] | None = None
) -> st.SearchStrategy[Request]:
    """Valid legacy completion requests."""
    return st.builds(
        _assemble,
        st.fixed_dictionaries(
            {
                "model": model if model is not None else st.sampled_from(["m-a", "m-b"]),
                "prompt": st.one_of(_text, st.lists(st.integers(0, 50000), min_size=1, max_size=8)),
            },
            optional=_OPTIONAL_COMPLETION,
        ),
        st.dictionaries(_unknown_name, json_values, max_size=2),
    )


def requests() -> st.SearchStrategy[Request]:
    """Chat or completion requests."""
    return st.one_of(chat_requests(), completion_requests())


def _assemble(known: Request, unknown: Request) -> Request:
    out = dict(known)
    for k, v in unknown.items():
        out.setdefault(k, v)
    return out


# --- respellings: same meaning, different bytes ------------------------------------------------


def _respell_number(x: Any) -> Any:
    if isinstance(x, bool):
        return x
    if isinstance(x, int) and abs(x) <= 2**53:
        return float(x)
    if isinstance(x, float) and x == 0.0:
        return -0.0 if str(x) == "0.0" else 0
    if isinstance(x, float) and x.is_integer() and abs(x) <= 2**53:
        return int(x)
    return x


def _respell_deep(value: Any, draw: Callable[[st.SearchStrategy[Any]], Any]) -> Any:
    if isinstance(value, dict):
        keys = list(value)
        keys = draw(st.permutations(keys)) if keys else keys
        return {k: _respell_deep(value[k], draw) for k in keys}
    if isinstance(value, list):
        return [_respell_deep(v, draw) for v in value]
    if isinstance(value, (int, float)) and draw(st.booleans()):
        return _respell_number(value)
    return value


_CHAT_DEFAULTS: dict[str, Any] = {
    "temperature": 1,
    "top_p": 1,
    "n": 1,
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logprobs": False,
    "parallel_tool_calls": True,
    "seed": None,
    "max_tokens": None,
    "stop": None,
    "tools": [],
    "logit_bias": {},
    "response_format": {"type": "text"},
}
_COMPLETION_DEFAULTS: dict[str, Any] = {
    "temperature": 1,
    "top_p": 1,
    "n": 1,
    "best_of": 1,
    "max_tokens": 16,
    "echo": False,
    "suffix": None,
    "stop": [],
}


@st.composite
def respelled(draw: Callable[[st.SearchStrategy[Any]], Any], request: Request) -> Request:
    """An equivalent spelling of ``request``: must produce the same key.

    Reorders object keys, writes integral numbers as floats (and back, and -0.0), turns string
    contents into one-text-part lists, a single stop string into a list, adds omitted defaults
    explicitly (or nulls) and adds unkeyed fields such as ``stream`` and ``user``.
    """
    r = copy.deepcopy(request)
    chat = "messages" in r
    defaults = _CHAT_DEFAULTS if chat else _COMPLETION_DEFAULTS
    for name, default in defaults.items():
        if name not in r and draw(st.booleans()):
            r[name] = default
    if chat:
        for m in r["messages"]:
            if isinstance(m.get("content"), str) and draw(st.booleans()):
                m["content"] = [{"type": "text", "text": m["content"]}]
    elif isinstance(r["prompt"], str) and draw(st.booleans()):
        r["prompt"] = [r["prompt"]]
    if isinstance(r.get("stop"), str) and draw(st.booleans()):
        r["stop"] = [r["stop"]]
    elif isinstance(r.get("stop"), list) and r["stop"]:
        stop = list(r["stop"])
        r["stop"] = draw(st.permutations(stop)) + [stop[0]] * draw(st.integers(0, 1))
    if draw(st.booleans()):
        r["stream"] = draw(st.booleans())
    if draw(st.booleans()):
        r["user"] = draw(_text)
    if draw(st.booleans()):
        r["metadata"] = {"trace": draw(_text)}
    respelled: dict[str, Any] = _respell_deep(r, draw)
    return respelled


# --- mutations: one keyed field changes meaning ------------------------------------------------


def _bump_text(s: str) -> str:
    return s + " " if not s.endswith(" ") else s[:-1]


@st.composite
def mutated(
    draw: Callable[[st.SearchStrategy[Any]], Any], request: Request
) -> tuple[str, Request]:
    """Change one keyed field of ``request`` to a different meaning: must change the key.

    Returns the name of the changed field and the mutated request.
    """
    r = copy.deepcopy(request)
    chat = "messages" in r
    options: list[str] = ["temperature", "seed", "max_tokens", "stop", "unknown", "top_p"]
    options += ["message_text", "message_role", "append_message"] if chat else ["prompt"]
    if chat and len(r["messages"]) > 1:
        options.append("message_order")
    if chat and len(r.get("tools") or []) > 1:
        options.append("tool_order")
    choice = draw(st.sampled_from(options))
    if choice == "temperature":
        current = r.get("temperature", 1)
        r["temperature"] = 0.5 if current != 0.5 else 0.25
    elif choice == "top_p":
        current = r.get("top_p", 1)
        r["top_p"] = 0.5 if current != 0.5 else 0.25
    elif choice == "seed":
        r["seed"] = (r["seed"] + 1) if r.get("seed") is not None else 0
    elif choice == "max_tokens":
        default = None if chat else 16
        current = r.get("max_tokens", default)
        r["max_tokens"] = 7 if current != 7 else 8
    elif choice == "stop":
        stop = r.get("stop")
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        r["stop"] = stop + [f"{''.join(stop)}#"]
    elif choice == "unknown":
        name = draw(_unknown_name)
        if name in r:
            r[name] = [r[name]]
        else:
            r[name] = draw(json_values)
    elif choice == "message_text":
        i = draw(st.integers(0, len(r["messages"]) - 1))
        r["messages"][i]["content"] = _bump_text(r["messages"][i]["content"])
    elif choice == "message_role":
        i = draw(st.integers(0, len(r["messages"]) - 1))
        role = r["messages"][i]["role"]
        r["messages"][i]["role"] = "user" if role != "user" else "assistant"
    elif choice == "append_message":
        r["messages"].append({"role": "user", "content": draw(_text)})
    elif choice == "message_order":
        msgs = r["messages"]
        i = draw(st.integers(0, len(msgs) - 2))
        if msgs[i] == msgs[i + 1]:
            msgs[i]["content"] = _bump_text(msgs[i]["content"])
        else:
            msgs[i], msgs[i + 1] = msgs[i + 1], msgs[i]
    elif choice == "tool_order":
        tools = r["tools"]
        if tools[0] == tools[1]:
            tools[0]["function"]["name"] += "_"
        else:
            tools[0], tools[1] = tools[1], tools[0]
    elif choice == "prompt":
        p = r["prompt"]
        r["prompt"] = _bump_text(p) if isinstance(p, str) else p + [0]
    return choice, r


__all__ = [
    "chat_requests",
    "completion_requests",
    "json_values",
    "mutated",
    "requests",
    "respelled",
]
