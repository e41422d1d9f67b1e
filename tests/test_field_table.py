"""The one field table (``keying.fields``) against the three readers it drives: the key builder,
the service's checks and the engine. Each test walks the table, so a row added or changed
without the matching behaviour fails here."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cachesvc.app import create_app
from cachesvc.engine_request import EngineRequestError, check_fields, parse_request
from gpu_prefix.engine import Engine
from keying import UNKEYED_FIELDS, canonicalize
from keying.fields import (
    AS_SENT,
    FIELDS,
    KINDS,
    MODEL,
    Field,
    Honoured,
    Ignored,
    Keyed,
    Kind,
    NoopOnly,
    Transport,
    Unkeyed,
    check_valid,
    field,
    markdown_table,
    read_unkeyed,
)
from keying.normalisers import CHAT_FIELDS, COMPLETION_FIELDS
from tests.service_helpers import auth, make_settings
from tests.support.echo_upstream import EchoUpstream

DOCS = Path(__file__).resolve().parent.parent / "docs" / "keys.md"


def rows(decision: type) -> list[tuple[Field, Kind]]:
    """(row, kind) for every kind each row of this engine decision belongs to."""
    return [(f, k) for f in FIELDS if isinstance(f.engine, decision) for k in KINDS
            if f.keying(k) is not None]


def ids(pairs: list[tuple[Field, Kind]]) -> list[str]:
    return [f"{f.name}-{k}" for f, k in pairs]


def base(kind: Kind, model: str = "random-tiny") -> dict[str, Any]:
    if kind == "chat":
        return {"model": model, "messages": [{"role": "user", "content": "hello"}]}
    return {"model": model, "prompt": "hello"}


#: A value the engine honours that differs from the default, per (field, kind), with the fields
#: it needs beside it (sent both with and without the sample).
HONOURED_SAMPLES: dict[tuple[str, Kind], tuple[Any, dict[str, Any]]] = {
    ("messages", "chat"): ([{"role": "user", "content": "bye now"}], {}),
    ("prompt", "completion"): ("bye now", {}),
    **{(name, k): (v, {}) for k in KINDS for name, v in
       [("temperature", 0.5), ("top_p", 0.5), ("seed", 7), ("max_tokens", 3), ("stop", ["x"])]},
    ("max_completion_tokens", "chat"): (3, {}),
    ("logprobs", "chat"): (True, {}),
    ("logprobs", "completion"): (2, {}),
    ("top_logprobs", "chat"): (2, {"logprobs": True}),
}
#: Honoured fields with one value the engine serves: the table keys them, the engine checks them.
ONE_VALUE = {"model", "n"}

#: Honoured fields the engine varies on, and those with a keyed default.
VARIED = [(f, k) for f, k in rows(Honoured) if f.name not in ONE_VALUE]
DEFAULTED = [(f, k) for f, k in rows(Honoured)
             if isinstance(spec := f.keying(k), Keyed) and not spec.required]

#: A value of each field the engine refuses that is not a no-op (and is valid to key).
REFUSED_SAMPLES: dict[str, Any] = {
    "best_of": 2,
    "frequency_penalty": 0.5,
    "presence_penalty": 0.5,
    "logit_bias": {"50256": -100},
    "echo": True,
    "suffix": "tail",
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "tool_choice": "required",
    "functions": [{"name": "f"}],
    "function_call": "auto",
    "response_format": {"type": "json_object"},
    "reasoning_effort": "high",
    "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"},
    "prediction": {"type": "content", "content": "x"},
}

#: A value of each field the engine ignores.
IGNORED_SAMPLES: dict[str, Any] = {
    "parallel_tool_calls": False,
    "service_tier": "flex",
    "prompt_cache_key": "k1",
    "safety_identifier": "u-1",
    "user": "u-1",
    "metadata": {"a": "b"},
    "store": True,
    "request_id": "r-1",
    "timeout": 30,
    "request_timeout": 30,
}

#: A value of the right type, and one of a wrong type, for each unkeyed field.
UNKEYED_SAMPLES: dict[str, Any] = {
    "user": "u-1", "stream": True, "stream_options": {"include_usage": True},
    "metadata": {"a": "b"}, "store": True, "request_id": "r-1", "timeout": 30,
    "request_timeout": 30,
}
WRONG_TYPE = {"string": 5, "boolean": "yes", "object": [1]}


def key_of(body: dict[str, Any], kind: Kind) -> bytes:
    return canonicalize(body, kind).encoded


class TestTheTable:
    def test_the_table_keeps_its_invariants(self):
        check_valid(FIELDS)

    def test_a_row_without_an_engine_decision_cannot_be_written(self):
        with pytest.raises(TypeError, match="engine"):
            Field(  # type: ignore[call-arg]
                name="x_new", chat=AS_SENT, completion=AS_SENT, why="new")

    @pytest.mark.parametrize(
        ("change", "problem"),
        [
            ({"engine": None}, "no engine decision"),
            ({"engine": "honoured"}, "no engine decision"),
            ({"engine": Honoured(), "chat": AS_SENT}, "honours it but keys it as sent"),
            ({"engine": Honoured(), "chat": Unkeyed()}, "honours it but does not key it"),
            ({"engine": Transport()}, "delivery only but it is keyed"),
            ({"engine": NoopOnly(noop=(False,))}, "absent field must be a no-op"),
            ({"engine": Ignored(), "why": ""}, "say why"),
            ({"chat": None, "completion": None}, "belongs to no kind"),
        ],
    )
    def test_a_row_whose_engine_decision_does_not_fit_its_keying_fails_the_check(
        self, change, problem
    ):
        temperature = field("chat", "temperature")
        assert temperature is not None
        bad = dataclasses.replace(temperature, **change)
        with pytest.raises(AssertionError, match=problem):
            check_valid((*[f for f in FIELDS if f.name != "temperature"], bad))

    def test_a_name_twice_fails_the_check(self):
        with pytest.raises(AssertionError, match="twice"):
            check_valid((*FIELDS, FIELDS[3]))

    def test_the_key_builder_keys_with_a_default_exactly_the_table_s_keyed_fields(self):
        for kind, specs in (("chat", CHAT_FIELDS), ("completion", COMPLETION_FIELDS)):
            assert set(specs) == {f.name for f in FIELDS if isinstance(f.keying(kind), Keyed)}
        assert {f.name for f in FIELDS if isinstance(f.chat, Unkeyed)} == UNKEYED_FIELDS

    def test_the_docs_show_the_table_as_it_is(self):
        assert markdown_table() in DOCS.read_text(), (
            "docs/keys.md's field table is stale: paste keying.fields.markdown_table()"
        )

    def test_every_sample_here_names_a_row_of_its_decision(self):
        # The samples below are how the table's rows are exercised: one per row, no strays.
        assert set(HONOURED_SAMPLES) == {(f.name, k) for f, k in rows(Honoured)
                                         if f.name not in ONE_VALUE}
        assert set(REFUSED_SAMPLES) == {f.name for f in FIELDS if isinstance(f.engine, NoopOnly)}
        assert set(IGNORED_SAMPLES) == {f.name for f in FIELDS if isinstance(f.engine, Ignored)}
        assert set(UNKEYED_SAMPLES) == UNKEYED_FIELDS


class TestHonouredFields:
    @pytest.mark.parametrize(("row", "kind"), rows(Honoured), ids=ids(rows(Honoured)))
    def test_every_field_the_engine_honours_is_keyed(self, row: Field, kind: Kind):
        if row.name == "model":
            assert row.keying(kind) == MODEL  # the model id is its own part of the material
            return
        if row.name in ONE_VALUE:
            assert isinstance(row.keying(kind), Keyed)
            return
        value, context = HONOURED_SAMPLES[(row.name, kind)]
        without = {**base(kind), **context}
        assert key_of({**without, row.name: value}, kind) != key_of(without, kind)

    @pytest.mark.parametrize(("row", "kind"), VARIED, ids=ids(VARIED))
    def test_every_field_the_engine_honours_changes_what_it_generates(
        self, tiny_engine: Engine, row: Field, kind: Kind
    ):
        value, context = HONOURED_SAMPLES[(row.name, kind)]
        without = {**base(kind), **context}
        with_it = {**without, row.name: value}
        assert (parse_request(tiny_engine, with_it, kind, tenant="t")[:2]
                != parse_request(tiny_engine, without, kind, tenant="t")[:2])

    @pytest.mark.parametrize(("row", "kind"), DEFAULTED, ids=ids(DEFAULTED))
    def test_the_keyed_default_is_what_the_engine_does_when_the_field_is_omitted(
        self, tiny_engine: Engine, row: Field, kind: Kind
    ):
        spec = row.keying(kind)
        assert isinstance(spec, Keyed)
        context = HONOURED_SAMPLES.get((row.name, kind), (None, {}))[1]
        without = {**base(kind), **context}
        explicit = {**without, row.name: spec.default}
        assert key_of(explicit, kind) == key_of(without, kind)
        assert (parse_request(tiny_engine, explicit, kind, tenant="t")
                == parse_request(tiny_engine, without, kind, tenant="t"))

    def test_a_model_other_than_the_engine_s_is_a_404_naming_it(self, tiny_engine: Engine):
        with pytest.raises(EngineRequestError, match="model") as info:
            parse_request(tiny_engine, base("chat", "gpt-4o"), "chat", tenant="t")
        assert info.value.status == 404 and info.value.field == "model"

    @pytest.mark.parametrize("kind", KINDS)
    def test_more_than_one_choice_is_a_422_naming_n(self, tiny_engine: Engine, kind: Kind):
        with pytest.raises(EngineRequestError, match="n=1") as info:
            parse_request(tiny_engine, {**base(kind), "n": 2}, kind, tenant="t")
        assert info.value.status == 422 and info.value.field == "n"


class TestRefusedFields:
    @pytest.mark.parametrize(("row", "kind"), rows(NoopOnly), ids=ids(rows(NoopOnly)))
    def test_a_keyed_field_the_engine_cannot_honour_is_refused_naming_it_and_the_fix(
        self, tiny_engine: Engine, row: Field, kind: Kind
    ):
        body = {**base(kind), row.name: REFUSED_SAMPLES[row.name]}
        assert key_of(body, kind) != key_of(base(kind), kind)  # keyed: the sample is valid
        with pytest.raises(EngineRequestError) as info:
            parse_request(tiny_engine, body, kind, tenant="t")
        assert info.value.status == 422 and info.value.field == row.name
        assert info.value.message.startswith(f"{row.name}: ") and "remove it" in info.value.message

    @pytest.mark.parametrize(("row", "kind"), rows(NoopOnly), ids=ids(rows(NoopOnly)))
    def test_its_no_op_values_are_accepted(self, tiny_engine: Engine, row: Field, kind: Kind):
        assert isinstance(row.engine, NoopOnly)
        plain = parse_request(tiny_engine, base(kind), kind, tenant="t")
        for noop in row.engine.noop:
            body = {**base(kind), row.name: noop}
            assert parse_request(tiny_engine, body, kind, tenant="t") == plain

    @pytest.mark.parametrize("kind", KINDS)
    def test_a_field_of_no_row_is_keyed_as_sent_and_refused_with_a_400(self, kind: Kind):
        body = {**base(kind), "x_mystery": 1}
        assert key_of(body, kind) != key_of(base(kind), kind)
        with pytest.raises(EngineRequestError, match="not a recognised field") as info:
            check_fields(body, kind)
        assert info.value.status == 400 and info.value.field == "x_mystery"

    @pytest.mark.parametrize(("name", "kind"), [("max_completion_tokens", "completion"),
                                                ("top_logprobs", "completion"),
                                                ("prompt", "chat"), ("messages", "completion")])
    def test_a_field_of_the_other_kind_is_refused_with_a_400(self, name: str, kind: Kind):
        with pytest.raises(EngineRequestError, match="not a recognised field") as info:
            check_fields({**base(kind), name: 3}, kind)
        assert info.value.status == 400 and info.value.field == name


class TestIgnoredAndUnkeyedFields:
    @pytest.mark.parametrize(("row", "kind"), rows(Ignored), ids=ids(rows(Ignored)))
    def test_a_field_the_engine_ignores_changes_nothing_it_does(
        self, tiny_engine: Engine, row: Field, kind: Kind
    ):
        body = {**base(kind), row.name: IGNORED_SAMPLES[row.name]}
        assert (parse_request(tiny_engine, body, kind, tenant="t")
                == parse_request(tiny_engine, base(kind), kind, tenant="t"))

    @pytest.mark.parametrize(("row", "kind"), rows(Ignored), ids=ids(rows(Ignored)))
    def test_an_ignored_field_is_keyed_unless_the_table_says_it_cannot_change_the_output(
        self, row: Field, kind: Kind
    ):
        same = key_of({**base(kind), row.name: IGNORED_SAMPLES[row.name]}, kind) == key_of(
            base(kind), kind)
        assert same == isinstance(row.keying(kind), Unkeyed)

    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.parametrize("name", sorted(UNKEYED_SAMPLES))
    def test_an_unkeyed_field_leaves_the_key_alone(self, name: str, kind: Kind):
        assert key_of({**base(kind), name: UNKEYED_SAMPLES[name]}, kind) == key_of(base(kind), kind)

    @pytest.mark.parametrize(("row", "kind"), rows(Transport), ids=ids(rows(Transport)))
    def test_a_delivery_field_of_the_wrong_type_is_refused_by_the_engine_naming_it(
        self, tiny_engine: Engine, row: Field, kind: Kind
    ):
        spec = row.keying(kind)
        assert isinstance(spec, Unkeyed) and spec.type is not None
        body = {**base(kind), row.name: WRONG_TYPE[spec.type]}
        with pytest.raises(EngineRequestError) as info:
            parse_request(tiny_engine, body, kind, tenant="t")
        assert info.value.status == 400 and info.value.field == row.name
        assert spec.fix in info.value.message


class TestTheServiceReadsTheTable:
    @pytest.fixture
    def client(self, tmp_path: Any) -> Any:
        with TestClient(create_app(make_settings(tmp_path), upstream=EchoUpstream())) as c:
            yield c

    @pytest.mark.parametrize("field", list(read_unkeyed()), ids=lambda f: f.name)
    def test_an_unkeyed_field_the_service_reads_is_refused_with_a_400_of_its_wrong_type(
        self, client: TestClient, field: Any
    ):
        body = {"model": "echo-1", "messages": [{"role": "user", "content": "hi"}],
                "temperature": 0, field.name: WRONG_TYPE[field.json_type]}
        r = client.post("/v1/chat/completions", json=body, headers=auth())
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == field.name
        assert err["message"].endswith(f"`{field.name}` {field.problem}")
        assert err["fix"] == field.fix

    def test_the_service_reads_user_stream_and_stream_options(self):
        assert [f.name for f in read_unkeyed()] == ["user", "stream", "stream_options"]
