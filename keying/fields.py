"""The one table of OpenAI request fields: how each is keyed and what the engine does with it.

Three readers of a request work from this table, so what is keyed and what is served cannot
drift apart:

* ``keying.canonical`` validates and folds every field keyed with an explicit default
  (:class:`Keyed`), keys a field marked :data:`AS_SENT` (or not in the table) exactly as given,
  and leaves the :class:`Unkeyed` ones out of the key;
* ``cachesvc.response_cache`` checks the type of every unkeyed field the service reads
  (``user`` decides the scope, ``stream`` and ``stream_options`` the delivery);
* ``cachesvc.engine_request`` serves the :class:`Honoured` and :class:`Transport` fields,
  accepts the :class:`Ignored` ones, refuses a :class:`NoopOnly` field that holds anything but
  its no-op value with a 422 naming it, and refuses every field of no row for the kind with a 400.

A row says, per request kind, how the field is keyed (``None``: not a field of that kind, so
keyed as sent and refused by the engine), and one engine decision for every kind it belongs to.
``tests/test_field_table.py`` walks the table: every honoured field is keyed, every keyed field
the engine cannot honour is refused or its row says why ignoring it is safe, and every row has
an engine decision.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple

Kind = Literal["chat", "completion"]
KINDS: Final[tuple[Kind, ...]] = ("chat", "completion")

#: How a keyed value is validated and folded; ``keying.normalisers`` maps each to its normaliser.
ValueType = Literal[
    "number", "integer", "boolean", "string", "json",
    "messages", "prompt", "stop", "logit_bias", "tools", "response_format",
]

UnkeyedType = Literal["string", "boolean", "object"]

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
UINT64_MAX: Final = 2**64 - 1


@dataclass(frozen=True, kw_only=True, slots=True)
class Keyed:
    """Keyed with its default made explicit: an omitted field and its default key the same.

    ``lo``/``hi`` bound a number or an integer (``hi=None``: no upper bound); ``nullable``: an
    integer that may be null (its default ``None``). ``required``: the request needs it.
    """

    type: ValueType
    default: Any = None
    lo: int | None = None
    hi: int | None = None
    nullable: bool = False
    required: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class Unkeyed:
    """Cannot change the output: left out of the key (``keying.UNKEYED_FIELDS``).

    ``type`` is set when the service reads the field (then a value of another type is a 400
    with ``problem`` and ``fix``); ``None``: nobody reads it, any value passes.
    """

    type: UnkeyedType | None = None
    problem: str = ""
    fix: str = ""


#: Keyed exactly as given when present, like a field the table does not know (no default: an
#: absent field keys differently from any value). Adding a default would change existing keys.
AS_SENT: Final = "as sent"
#: The model id: its own part of the key material, not one of the keyed fields.
MODEL: Final = "model"

Keying = Keyed | Unkeyed | Literal["as sent", "model"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Honoured:
    """The engine implements the field. ``range`` replaces the keyed bounds where the engine
    implements a narrower one (a request outside it is a 400 or 422 naming the field)."""

    range: tuple[int, int | None] | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Transport:
    """The engine honours the field, but it shapes only the delivery (a stream, a usage chunk),
    never the content: it must be unkeyed."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Ignored:
    """Accepted and ignored by the engine; the row's ``why`` says why that is safe."""


@dataclass(frozen=True, kw_only=True, slots=True)
class NoopOnly:
    """The engine does not implement the field: any value but one of ``noop`` (the values that
    leave the feature off) is refused with a 422 naming the field."""

    noop: tuple[Any, ...]


EngineDecision = Honoured | Transport | Ignored | NoopOnly


@dataclass(frozen=True, kw_only=True, slots=True)
class Field:
    """One request field: how each kind keys it (``None``: not a field of that kind) and what
    the engine does with it."""

    name: str
    chat: Keying | None
    completion: Keying | None
    engine: EngineDecision
    why: str

    def keying(self, kind: str) -> Keying | None:
        return self.chat if kind == "chat" else self.completion if kind == "completion" else None


_NUMBER_PENALTY = Keyed(type="number", default=0, lo=-2, hi=2)
_NOT_RUN = "the engine runs no tools; refused unless it asks for none"
# The unkeyed rows: one value for both kinds (check_valid asserts the kinds agree).
_USER = Unkeyed(type="string", problem="must be a string",
                fix="send the end user's id as a string, or leave it out")
_STREAM = Unkeyed(type="boolean", problem="must be true or false",
                  fix="send stream: true for SSE, or leave it out")
_STREAM_OPTIONS = Unkeyed(type="object", problem="must be an object",
                          fix='send e.g. {"include_usage": true}, or leave it out')
_NOT_READ = Unkeyed()

# NOTE: the order is the order of the docs' table and of the checks the service makes on the
# unkeyed fields it reads (user, then stream, then stream_options).
FIELDS: Final[tuple[Field, ...]] = (
    Field(name="model", chat=MODEL, completion=MODEL, engine=Honoured(),
          why="the model id; another model than the engine's is a 404"),
    Field(name="messages", chat=Keyed(type="messages", required=True), completion=None,
          engine=Honoured(), why="the conversation, through the model's chat template"),
    Field(name="prompt", chat=None, completion=Keyed(type="prompt", required=True),
          engine=Honoured(), why="one prompt: a string or token ids"),
    Field(name="temperature", chat=Keyed(type="number", default=1, lo=0, hi=2),
          completion=Keyed(type="number", default=1, lo=0, hi=2), engine=Honoured(),
          why="sampling temperature; 0 is greedy"),
    Field(name="top_p", chat=Keyed(type="number", default=1, lo=0, hi=1),
          completion=Keyed(type="number", default=1, lo=0, hi=1), engine=Honoured(),
          why="nucleus sampling; the engine refuses 0 (it keeps no token)"),
    Field(name="n", chat=Keyed(type="integer", default=1, lo=1, hi=128),
          completion=Keyed(type="integer", default=1, lo=1, hi=128),
          engine=Honoured(range=(1, None)),
          why="choices per request; the engine serves one (n > 1 is a 422)"),
    Field(name="best_of", chat=AS_SENT, completion=Keyed(type="integer", default=1, lo=1, hi=20),
          engine=NoopOnly(noop=(None, 1)), why="server-side candidates; the engine makes one"),
    Field(name="max_tokens", chat=Keyed(type="integer", lo=1, nullable=True),
          completion=Keyed(type="integer", default=16, lo=0), engine=Honoured(range=(1, None)),
          why="length cap; omitted, the engine writes up to 128 (chat) or 16 (completion)"),
    Field(name="max_completion_tokens", chat=Keyed(type="integer", lo=1, nullable=True),
          completion=None, engine=Honoured(), why="chat's newer name for max_tokens"),
    Field(name="seed", chat=Keyed(type="integer", lo=INT64_MIN, hi=UINT64_MAX, nullable=True),
          completion=Keyed(type="integer", lo=INT64_MIN, hi=UINT64_MAX, nullable=True),
          engine=Honoured(range=(INT64_MIN, INT64_MAX)),
          why="sampling seed; the engine takes a signed 64-bit one"),
    Field(name="stop", chat=Keyed(type="stop"), completion=Keyed(type="stop"), engine=Honoured(),
          why="stop sequences, a set; the engine takes up to 4 non-empty ones"),
    Field(name="frequency_penalty", chat=_NUMBER_PENALTY, completion=_NUMBER_PENALTY,
          engine=NoopOnly(noop=(0, 0.0, None)), why="not implemented by the engine"),
    Field(name="presence_penalty", chat=_NUMBER_PENALTY, completion=_NUMBER_PENALTY,
          engine=NoopOnly(noop=(0, 0.0, None)), why="not implemented by the engine"),
    Field(name="logit_bias", chat=Keyed(type="logit_bias"), completion=Keyed(type="logit_bias"),
          engine=NoopOnly(noop=(None, {})), why="not implemented by the engine"),
    Field(name="logprobs", chat=Keyed(type="boolean", default=False),
          completion=Keyed(type="integer", lo=0, hi=5, nullable=True), engine=Honoured(),
          why="chat: true or false; completion: how many alternatives (0-5)"),
    Field(name="top_logprobs", chat=Keyed(type="integer", lo=0, hi=20, nullable=True),
          completion=None, engine=Honoured(), why="alternatives per token; needs logprobs"),
    Field(name="echo", chat=AS_SENT, completion=Keyed(type="boolean", default=False),
          engine=NoopOnly(noop=(None, False)), why="not implemented by the engine"),
    Field(name="suffix", chat=AS_SENT, completion=Keyed(type="string"),
          engine=NoopOnly(noop=(None, "")), why="insertion; not implemented by the engine"),
    Field(name="tools", chat=Keyed(type="tools"), completion=AS_SENT,
          engine=NoopOnly(noop=(None, [])), why=_NOT_RUN),
    # NOTE: chat's tool_choice defaults to "none" without tools and "auto" with them;
    # keying.canonical fills that in.
    Field(name="tool_choice", chat=Keyed(type="json"), completion=AS_SENT,
          engine=NoopOnly(noop=(None, "none")), why=_NOT_RUN),
    Field(name="parallel_tool_calls", chat=Keyed(type="boolean", default=True), completion=AS_SENT,
          engine=Ignored(), why="keyed; ignored by the engine, which runs no tools"),
    Field(name="functions", chat=AS_SENT, completion=AS_SENT, engine=NoopOnly(noop=(None, [])),
          why=_NOT_RUN),
    Field(name="function_call", chat=AS_SENT, completion=AS_SENT,
          engine=NoopOnly(noop=(None, "none")), why=_NOT_RUN),
    Field(name="response_format", chat=Keyed(type="response_format"), completion=AS_SENT,
          engine=NoopOnly(noop=(None, {"type": "text"})),
          why="structured output; the engine writes text only"),
    Field(name="reasoning_effort", chat=Keyed(type="string"), completion=AS_SENT,
          engine=NoopOnly(noop=(None,)), why="not implemented by the engine"),
    Field(name="modalities", chat=AS_SENT, completion=AS_SENT,
          engine=NoopOnly(noop=(None, ["text"])),
          why="the engine writes text only"),
    Field(name="audio", chat=AS_SENT, completion=AS_SENT, engine=NoopOnly(noop=(None,)),
          why="the engine writes text only"),
    Field(name="prediction", chat=AS_SENT, completion=AS_SENT, engine=NoopOnly(noop=(None,)),
          why="predicted output; not implemented by the engine"),
    Field(name="service_tier", chat=Keyed(type="string"), completion=AS_SENT, engine=Ignored(),
          why="keyed (a provider's tiers may serve different builds); the engine has one tier"),
    Field(name="prompt_cache_key", chat=AS_SENT, completion=AS_SENT, engine=Ignored(),
          why="keyed as sent; a provider's cache-routing hint, nothing to the engine"),
    Field(name="safety_identifier", chat=AS_SENT, completion=AS_SENT, engine=Ignored(),
          why="keyed as sent; an end-user id for abuse tracking, nothing to the engine"),
    Field(name="user", chat=_USER, completion=_USER, engine=Ignored(),
          why="end-user id; decides a per-user tenant's scope, which isolates users"),
    Field(name="stream", chat=_STREAM, completion=_STREAM, engine=Transport(),
          why="a hit replays as a stream or a body as asked"),
    Field(name="stream_options", chat=_STREAM_OPTIONS, completion=_STREAM_OPTIONS,
          engine=Transport(), why="the stream's shape (a usage chunk), not its content"),
    Field(name="metadata", chat=_NOT_READ, completion=_NOT_READ, engine=Ignored(),
          why="stored-completion tags"),
    Field(name="store", chat=_NOT_READ, completion=_NOT_READ, engine=Ignored(),
          why="whether the provider keeps the completion"),
    Field(name="request_id", chat=_NOT_READ, completion=_NOT_READ, engine=Ignored(),
          why="a client's request id"),
    Field(name="timeout", chat=_NOT_READ, completion=_NOT_READ, engine=Ignored(),
          why="a client's time limit"),
    Field(name="request_timeout", chat=_NOT_READ, completion=_NOT_READ, engine=Ignored(),
          why="a client's time limit"),
)

def check_valid(rows: tuple[Field, ...] = FIELDS) -> None:
    """Assert the table's invariants: each row has an engine decision that fits its keying.

    * a name appears once, and belongs to at least one kind, with a ``why``;
    * the engine honours only fields keyed with their default made explicit (or the model), so
      the key holds every value the engine acts on, and an omitted field keys as its default;
    * a field that shapes only the delivery is unkeyed and typed (the engine reads it);
    * a field the engine refuses is keyed, and absent (null) is one of its no-op values;
    * every kind of a field keys it the same way when unkeyed (the service reads it once);
    * bounded values have their bounds; a required field has no default.
    """
    seen: set[str] = set()
    for f in rows:
        assert f.name not in seen, f"{f.name}: in the table twice"
        seen.add(f.name)
        kinds = [(kind, k) for kind in KINDS if (k := f.keying(kind)) is not None]
        assert kinds, f"{f.name}: belongs to no kind; set chat or completion"
        assert f.why, f"{f.name}: say why the engine's decision is right"
        e = f.engine
        assert isinstance(e, Honoured | Transport | Ignored | NoopOnly), (
            f"{f.name}: no engine decision; give it Honoured, Transport, Ignored or NoopOnly"
        )
        for kind, k in kinds:
            where = f"{f.name} ({kind})"
            if isinstance(e, Honoured):
                assert k != AS_SENT, f"{where}: the engine honours it but keys it as sent"
                assert not isinstance(k, Unkeyed), (
                    f"{where}: the engine honours it but does not key it")
            if isinstance(e, Transport):
                assert isinstance(k, Unkeyed), f"{where}: delivery only but it is keyed"
                assert k.type is not None, f"{where}: the engine reads it, so give it a type"
            if isinstance(e, NoopOnly):
                assert not isinstance(k, Unkeyed), f"{where}: refused but unkeyed; ignore it"
                assert None in e.noop, f"{where}: an absent field must be a no-op"
            if isinstance(k, Keyed):
                if k.type == "number":
                    assert k.lo is not None and k.hi is not None, f"{where}: give both bounds"
                if k.type == "integer":
                    assert k.lo is not None, f"{where}: give a lower bound"
                if k.required or k.nullable:
                    assert k.default is None, f"{where}: a required or nullable default is null"
            if isinstance(k, Unkeyed):
                assert all(other == k for _, other in kinds), (
                    f"{where}: unkeyed differently by kind")
                if k.type is not None:
                    assert k.problem and k.fix, (
                        f"{where}: a checked field needs a problem and a fix")
    for kind in KINDS:
        required = [f.name for f in rows if isinstance(k := f.keying(kind), Keyed) and k.required]
        assert len(required) == 1, f"{kind}: exactly one required field, got {required}"


check_valid()

_BY_KIND: Final[dict[str, dict[str, Field]]] = {
    kind: {f.name: f for f in FIELDS if f.keying(kind) is not None} for kind in KINDS
}


def field(kind: str, name: str) -> Field | None:
    """The row of ``name`` for requests of ``kind``; ``None`` when it is not a field of it."""
    rows = _BY_KIND.get(kind)
    return rows.get(name) if rows is not None else None


def fields_of(kind: Kind) -> dict[str, Field]:
    """The rows of ``kind``'s fields, by name, in table order."""
    return dict(_BY_KIND[kind])


def keyed_specs(kind: Kind) -> dict[str, Keyed]:
    """Each field ``kind`` keys with its default made explicit, by name."""
    return {f.name: k for f in FIELDS if isinstance(k := f.keying(kind), Keyed)}


def unkeyed_names() -> frozenset[str]:
    """Every field that cannot change the output, whatever the kind (never keyed)."""
    return frozenset(
        f.name for f in FIELDS for kind in KINDS if isinstance(f.keying(kind), Unkeyed)
    )


_PY_TYPES: Final[dict[str, type]] = {"string": str, "boolean": bool, "object": dict}


class ReadField(NamedTuple):
    """An unkeyed field the service reads, with its type rule."""

    name: str
    json_type: UnkeyedType
    problem: str
    fix: str
    #: The Python type a parsed JSON value of ``json_type`` has (for a plain ``isinstance``).
    pytype: type


def read_unkeyed() -> tuple[ReadField, ...]:
    """The unkeyed fields the service reads, with their type rule, in table order (kinds agree:
    a test checks it)."""
    out = []
    for f in FIELDS:
        spec = f.chat if isinstance(f.chat, Unkeyed) else f.completion
        if isinstance(spec, Unkeyed) and spec.type is not None:
            out.append(ReadField(f.name, spec.type, spec.problem, spec.fix,
                                 _PY_TYPES[spec.type]))
    return tuple(out)


def has_type(value: Any, type_: UnkeyedType) -> bool:
    """Whether a (non-null) JSON value is of an :class:`Unkeyed` field's ``type``."""
    return isinstance(value, _PY_TYPES[type_])


def _keying_cell(k: Keying | None) -> str:
    if k is None:
        return "—"
    if isinstance(k, Unkeyed):
        return "unkeyed" + (f" ({k.type})" if k.type else "")
    if not isinstance(k, Keyed):
        return str(k)
    out: str = k.type
    if k.lo is not None:
        out += " " + _range(k.lo, k.hi)
    if k.nullable:
        out += " or null"
    out += ", required" if k.required else f", default {json.dumps(k.default)}"
    return out


def _range(lo: int, hi: int | None) -> str:
    names = {INT64_MIN: "-2^63", INT64_MAX: "2^63-1", UINT64_MAX: "2^64-1"}
    if hi is None:
        return f">= {lo}"
    return f"[{names.get(lo, str(lo))}, {names.get(hi, str(hi))}]"


def _engine_cell(e: EngineDecision) -> str:
    if isinstance(e, Honoured):
        if e.range is None:
            return "honoured"
        return "honoured, " + _range(*e.range)
    if isinstance(e, Transport):
        return "honoured (delivery only)"
    if isinstance(e, Ignored):
        return "ignored"
    return "422 unless " + " or ".join(f"`{json.dumps(v)}`" for v in e.noop)


def markdown_table() -> str:
    """The table as Markdown, for ``docs/keys.md`` (a test keeps the docs equal to it)."""
    lines = ["| field | chat | completion | engine | why |", "|---|---|---|---|---|"]
    for f in FIELDS:
        lines.append(f"| `{f.name}` | {_keying_cell(f.chat)} | {_keying_cell(f.completion)} | "
                     f"{_engine_cell(f.engine)} | {f.why} |")
    return "\n".join(lines) + "\n"
