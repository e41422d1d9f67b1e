"""Edges of the key builder that the main suites do not reach: each scope rule and the field it
names, escaping at its length bound, framing's map order, material that is not ours, and each
reason a request is or is not cacheable.

Written from a mutation run (``make mutation``, README): each test pins a behaviour that a
single changed operator or constant in ``keying/`` would otherwise change unnoticed.
"""

from __future__ import annotations

import datetime
import fractions
import hashlib
import re
import sys
import threading
from enum import IntEnum
from types import MappingProxyType
from typing import Any

import msgpack
import pytest

from keying import (
    InvalidMaterialError,
    InvalidRequestError,
    KeyLimits,
    KeyParams,
    RequestTooLargeError,
    Scope,
    build_key,
    canonicalize,
    decode_material,
    escape_component,
    frame,
    hash_block_tokens,
    material_digest,
    rebuild_key,
    xxh3_128,
)
from keying.cacheability import Cacheability, assess, live_data
from keying.canonical_json import canon_number, canon_value
from keying.escape import MAX_COMPONENT
from keying.fields import Keyed
from keying.framing import frame_presorted
from keying.material import MATERIAL_VERSION, encode_material
from keying.normalisers import _defaults, _int_in, _messages, _number_in, _Spec, _spec, _stop

ACME = Scope.for_tenant("acme")


def chat(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    body.update(fields)
    return body


class TestScopeRules:
    @pytest.mark.parametrize(("kwargs", "field", "problem", "fix"), [
        ({"kind": "public", "tenant": "t"}, "scope", "a public scope names no tenant or user",
         "drop --tenant/--user"),
        ({"kind": "public", "user": "u"}, "scope", "a public scope names no tenant or user",
         "drop --tenant/--user"),
        ({"kind": "group", "tenant": "t"}, "scope", "unknown scope kind 'group'",
         "use tenant, user or public"),
        ({"kind": "tenant"}, "scope.tenant", "a tenant or user scope needs a tenant id",
         "give a tenant id"),
        ({"kind": "tenant", "tenant": ""}, "scope.tenant",
         "a tenant or user scope needs a tenant id", "give a tenant id"),
        ({"kind": "tenant", "tenant": 7}, "scope.tenant",
         "a tenant or user scope needs a tenant id", "give a tenant id"),
        ({"kind": "user", "tenant": "t"}, "scope.user", "a user scope needs a user id",
         "send the request's `user` field or use scope tenant"),
        ({"kind": "user", "tenant": "t", "user": ""}, "scope.user", "a user scope needs a user id",
         "send the request's `user` field or use scope tenant"),
        ({"kind": "user", "tenant": "t", "user": 3}, "scope.user", "a user scope needs a user id",
         "send the request's `user` field or use scope tenant"),
        ({"kind": "tenant", "tenant": "t", "user": "u"}, "scope.user",
         "a tenant scope names no user", "use scope user to key per user"),
    ])
    def test_an_impossible_scope_is_refused_naming_its_field_and_the_fix(
            self, kwargs: dict[str, Any], field: str, problem: str, fix: str) -> None:
        with pytest.raises(InvalidRequestError) as err:
            Scope(**kwargs)
        assert (err.value.field, err.value.problem, err.value.fix) == (field, problem, fix)

    def test_each_kind_has_its_label_and_material(self) -> None:
        assert Scope.public().label == "public"
        assert Scope.public().as_material() == ["public", None, None]
        assert ACME.label == "tenant:acme"
        assert Scope.for_user("acme", "bob").label == "user:acme/bob"
        assert Scope.for_user("acme", "bob").as_material() == ["user", "acme", "bob"]

    @pytest.mark.parametrize("scope", [Scope.public(), ACME, Scope.for_user("acme", "bob")])
    def test_material_reads_back_to_the_same_scope(self, scope: Scope) -> None:
        assert Scope.from_material(scope.as_material()) == scope


class TestEscaping:
    @pytest.fixture(autouse=True)
    def _fresh_cache(self) -> None:
        escape_component.cache_clear()  # each case computes its escape, not a cached one

    def test_a_safe_component_is_kept_as_is_up_to_the_bound(self) -> None:
        assert escape_component("a" * MAX_COMPONENT) == "a" * MAX_COMPONENT

    def test_a_safe_component_over_the_bound_becomes_a_digest(self) -> None:
        value = "a" * (MAX_COMPONENT + 1)
        expected = "~" + hashlib.blake2b(value.encode(), digest_size=20).hexdigest()
        assert escape_component(value) == expected

    def test_an_escaped_component_that_fits_is_kept_readable(self) -> None:
        # 32 colons escape to 96 characters: exactly the bound, so no digest
        assert escape_component(":" * 32) == "%3A" * 32
        assert escape_component(":" * 33).startswith("~")

    def test_multibyte_characters_escape_byte_by_byte_in_upper_hex(self) -> None:
        assert escape_component("é*") == "%C3%A9%2A"


class TestFraming:
    def test_map_keys_of_mixed_types_order_by_type_name_then_value(self) -> None:
        assert frame({"b": 1, 2: 0, "a": 1, 1: 0}) == msgpack.packb(
            {1: 0, 2: 0, "a": 1, "b": 1}, use_bin_type=True)

    def test_nested_maps_in_lists_are_sorted_too(self) -> None:
        assert frame([{"b": 1, "a": 2}]) == frame([{"a": 2, "b": 1}])
        assert frame(({"b": 1, "a": 2},)) == msgpack.packb([{"a": 2, "b": 1}])


class TestMaterialThatIsNotOurs:
    def material(self) -> bytes:
        return build_key(chat(temperature=0), KeyParams(scope=ACME)).material

    def parts(self) -> list[Any]:
        return msgpack.unpackb(self.material(), raw=False, strict_map_key=False,
                               ext_hook=lambda c, d: msgpack.ExtType(c, d))

    def repack(self, parts: list[Any]) -> bytes:
        return msgpack.packb(parts, use_bin_type=True)

    @pytest.mark.parametrize(("index", "value", "words"), [
        (2, ["model", ""], "model: not a non-empty string"),
        (2, ["model", 5], "model: not a non-empty string"),
        (3, ["epoch", -1], "epoch: not a non-negative integer"),
        (3, ["epoch", "1"], "epoch: not a non-negative integer"),
        (4, ["adapter", 3], "adapter: not a string or nil"),
        (5, ["kind", "embedding"], "kind: 'embedding' is not chat, completion or generic"),
        (6, ["request", [1]], "request: not a map of fields"),
        (1, ["scope", ["tenant", None, None]], "scope:"),
        (1, ["scope", ["tenant"]], "scope:"),
    ])
    def test_a_bad_part_is_refused_by_name(self, index: int, value: list[Any], words: str) -> None:
        parts = self.parts()
        parts[index] = value
        with pytest.raises(InvalidMaterialError, match="^" + re.escape(words)):
            decode_material(self.repack(parts))

    def test_a_request_map_with_a_key_that_is_not_a_string_is_not_ours(self) -> None:
        parts = self.parts()
        parts[6] = ["request", {1: "x"}]
        with pytest.raises(InvalidMaterialError, match=r"^not msgpack: "):
            decode_material(self.repack(parts))

    def test_material_that_is_not_what_its_request_keys_to_is_refused(self) -> None:
        parts = self.parts()
        fields = dict(parts[6][1])
        del fields["top_p"]  # keys again with the default put back: other bytes
        parts[6] = ["request", fields]
        with pytest.raises(InvalidMaterialError,
                           match=r"^keying its request again gives other material$"):
            rebuild_key(self.repack(parts))

    def test_material_rebuilds_under_the_secret_it_was_keyed_with(self) -> None:
        secret = b"s" * 32
        k = build_key(chat(temperature=0), KeyParams(scope=ACME, secret=secret))
        assert rebuild_key(k.material, secret=secret).material_digest == k.material_digest
        assert rebuild_key(k.material).material_digest != k.material_digest

    def test_the_json_parts_of_material_read_back_as_values(self) -> None:
        tools = [{"type": "function", "function": {"name": "f", "strict": False}}]
        k = build_key(chat(temperature=0, tools=tools), KeyParams(scope=ACME))
        fields = decode_material(k.material).fields
        assert fields["tools"] == tools
        assert fields["messages"] == [{"content": "hi", "role": "user"}]

    def test_generic_material_reads_back_as_generic(self) -> None:
        k = build_key({"model": "m", "input": "x", "temperature": 0}, KeyParams(scope=ACME))
        assert decode_material(k.material).kind == "generic"
        assert rebuild_key(k.material).digest == k.digest

    @pytest.mark.parametrize("mutate", [
        lambda p: p[:6],
        lambda p: ["llmcache-key/v1", *p[1:]],
        lambda p: [p[0], ["model", "acme"], *p[2:]],
        lambda p: [p[0], ["scope", ACME.as_material(), 1], *p[2:]],
        lambda p: [p[0], "scope", *p[2:]],
    ])
    def test_another_layout_is_refused_whole(self, mutate: Any) -> None:
        with pytest.raises(InvalidMaterialError, match=f"not {MATERIAL_VERSION} material"):
            decode_material(self.repack(mutate(self.parts())))

    def test_an_unknown_extension_type_is_refused_by_code(self) -> None:
        parts = self.parts()
        parts[6] = ["request", {"x": msgpack.ExtType(9, b"[]")}]
        with pytest.raises(InvalidMaterialError, match="unknown msgpack extension code 9"):
            decode_material(self.repack(parts))

    def test_bytes_that_are_not_msgpack_are_refused(self) -> None:
        with pytest.raises(InvalidMaterialError, match="not msgpack"):
            decode_material(b"\xc1")

    def test_material_whose_request_no_longer_keys_is_refused(self) -> None:
        parts = self.parts()
        parts[6] = ["request", {"temperature": "hot"}]
        with pytest.raises(InvalidMaterialError, match="does not key again"):
            rebuild_key(self.repack(parts))

    def test_a_user_scope_and_an_adapter_read_back(self) -> None:
        scope = Scope.for_user("acme", "bob")
        k = build_key(chat(temperature=0), KeyParams(scope=scope, epoch=4, adapter="lora-1"))
        parts = decode_material(k.material)
        assert (parts.scope, parts.epoch, parts.adapter, parts.kind) == (scope, 4, "lora-1", "chat")
        assert (k.scope, k.epoch, k.adapter) == (scope, 4, "lora-1")
        assert rebuild_key(k.material).digest == k.digest


class TestMaterialParameters:
    @pytest.mark.parametrize("epoch", [-1, True, 1.0, "1"])
    def test_an_epoch_that_is_not_a_non_negative_int_is_refused(self, epoch: Any) -> None:
        with pytest.raises(InvalidRequestError, match="is not a non-negative integer") as err:
            encode_material(scope=ACME, model="m", epoch=epoch, adapter=None,
                            request=canonicalize(chat()))
        assert err.value.field == "epoch"
        assert err.value.fix == "pass the model's epoch from the registry"

    def test_an_epoch_of_an_int_subclass_frames_as_the_int(self) -> None:
        class Epoch(IntEnum):
            THREE = 3

        request = canonicalize(chat())
        assert encode_material(scope=ACME, model="m", epoch=Epoch.THREE, adapter=None,
                               request=request) == encode_material(
            scope=ACME, model="m", epoch=3, adapter=None, request=request)

    def test_an_adapter_that_is_not_a_string_is_refused(self) -> None:
        with pytest.raises(InvalidRequestError, match=(
                r"^adapter: must be a string or absent; pass an adapter id$")) as err:
            encode_material(scope=ACME, model="m", epoch=0, adapter=5,  # type: ignore[arg-type]
                            request=canonicalize(chat()))
        assert err.value.field == "adapter"

    def test_explain_reports_the_key_in_json_ready_form(self) -> None:
        k = build_key(chat(temperature=0, stream=True), KeyParams(scope=ACME, epoch=2))
        e = k.explain()
        assert e["digest"] == k.digest.hex()
        assert e["material_digest"] == k.material_digest.hex()
        assert (e["cacheable"], e["scope"], e["model"], e["epoch"], e["kind"], e["adapter"]) == (
            True, "tenant:acme", "m", 2, "chat", None)
        assert e["keyed"] == k.canonical.fields
        with_adapter = build_key(chat(temperature=0), KeyParams(scope=ACME, adapter="lora-1"))
        assert with_adapter.explain()["adapter"] == "lora-1"
        assert e["reason"] == "deterministic: temperature=0"
        assert "stream" in e["unkeyed"] and "stream" in e["unkeyed_policy"]
        assert e["material_bytes"] == len(k.material)
        assert e["material_version"] == MATERIAL_VERSION
        assert k.model == "m"


class TestCacheability:
    def verdict(self, **fields: Any) -> tuple[bool, str, bool]:
        c = assess(canonicalize(chat(**fields)))
        return c.cacheable, c.reason, c.reproducible

    def test_greedy_is_cacheable_and_reproducible(self) -> None:
        assert self.verdict(temperature=0) == (True, "deterministic: temperature=0", True)

    def test_a_seed_makes_sampling_reproducible(self) -> None:
        assert self.verdict(temperature=0.7, seed=5) == (True, "seeded: seed=5", True)
        assert self.verdict(temperature=0, seed=5) == (True, "seeded: seed=5", True)

    def test_sampling_without_a_seed_bypasses_unless_opted_in(self) -> None:
        assert self.verdict(temperature=0.5) == (
            False, "nondeterministic: temperature=0.5 > 0 and no seed", False)
        opted = assess(canonicalize(chat(temperature=0.5)), allow_nondeterministic=True)
        assert (opted.cacheable, opted.reproducible) == (True, False)
        assert opted.reason == "opted in: nondeterministic: temperature=0.5 > 0 and no seed"

    def test_several_greedy_choices_without_a_seed_bypass(self) -> None:
        assert self.verdict(temperature=0, n=2) == (
            False, "nondeterministic: n=2 > 1 and no seed", False)

    @pytest.mark.parametrize("best_of", [2, 3])
    def test_best_of_over_one_without_a_seed_bypasses(self, best_of: int) -> None:
        c = assess(canonicalize({"model": "m", "prompt": "p", "temperature": 0,
                                 "best_of": best_of}))
        assert (c.cacheable, c.reason) == (
            False, f"nondeterministic: best_of={best_of} > 1 and no seed")

    def test_a_generic_request_s_best_of_without_n_bypasses_with_its_reason(self) -> None:
        # A generic request has no n unless it sends one: it counts as 1.
        c = assess(canonicalize({"model": "m", "input": "x", "temperature": 0, "best_of": 3}))
        assert (c.cacheable, c.reason) == (False, "nondeterministic: best_of=3 > 1 and no seed")

    def test_a_generic_request_at_or_below_zero_temperature_without_a_seed_is_greedy(
            self) -> None:
        for temperature in (0, -1):
            c = assess(canonicalize({"model": "m", "input": "x", "temperature": temperature}))
            assert (c.cacheable, c.reason, c.reproducible) == (
                True, "deterministic: temperature=0", True)

    @pytest.mark.parametrize("temperature", [False, True, "0", None, [0]])
    @pytest.mark.parametrize("seed", [None, 5])
    def test_a_generic_request_whose_temperature_is_not_a_number_bypasses_seeded_or_not(
            self, temperature: Any, seed: int | None) -> None:
        body = {"model": "m", "input": "x", "temperature": temperature}
        if seed is not None:
            body["seed"] = seed
        request = canonicalize(body)
        assert assess(request) == Cacheability(
            cacheable=False, reason="nondeterministic: temperature is not a number")
        assert assess(request, allow_nondeterministic=True) == Cacheability(
            cacheable=True, reason="opted in: nondeterministic: temperature is not a number")

    def test_a_generic_request_without_a_temperature_is_sampled(self) -> None:
        c = assess(canonicalize({"model": "m", "input": "x"}))
        assert (c.cacheable, c.reason) == (
            False, "nondeterministic: temperature=1 > 0 and no seed")

    @pytest.mark.parametrize(("fields", "rule"), [
        ({"web_search_options": {}}, "web_search_options"),
        ({"search_parameters": {"mode": "on"}}, "search_parameters"),
        ({"plugins": [{"id": "web"}]}, "plugins"),
        ({"model": "m:online"}, "an :online model"),
    ])
    def test_live_data_always_bypasses_with_its_rule_named(self, fields: dict, rule: str) -> None:
        request = canonicalize(chat(temperature=0, **fields))
        assert live_data(request) == rule
        assert assess(request, allow_nondeterministic=True) == Cacheability(
            cacheable=False,
            reason=f"live data: {rule} makes the answer depend on when it is asked")

    def test_an_empty_plugin_list_is_not_live_data(self) -> None:
        assert live_data(canonicalize(chat(temperature=0, plugins=[]))) is None


C: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
P: dict[str, Any] = {"model": "m", "prompt": "p"}


def msg(**m: Any) -> dict[str, Any]:
    return {**C, "messages": [m]}


class TestEveryRefusalNamesFieldProblemAndFix:
    """The 4xx a gateway sees: the field's path, what is wrong with it, and what to send."""

    @pytest.mark.parametrize(("body", "kind", "expected"), [
        ([1], None, ("request", "expected a JSON object, got array",
                     "send the request body as an object")),
        ({"messages": []}, None, ("model", "missing or not a non-empty string",
                                  'set "model" to the model id')),
        ({"model": "m"}, "chat", ("messages", "missing", 'send "messages"')),
        ({"model": "m"}, "completion", ("prompt", "missing", 'send "prompt"')),
        ({**C, "messages": "x"}, None, (
            "messages", "expected an array, got string",
            "send messages as an array of {role, content} objects")),
        ({**C, "messages": []}, None, ("messages", "no messages", "send at least one message")),
        ({**C, "messages": [5]}, None, ("messages[0]", "expected an object, got integer",
                                        "send each message as {role, content}")),
        (msg(content="x", role=""), None, (
            "messages[0].role", "missing or non-string role",
            "set role to system, developer, user, assistant or tool")),
        (msg(role="user", content=5), None, (
            "messages[0].content", "expected a string, an array of parts or null, got integer",
            "send content as a string or parts")),
        (msg(role="user", content=[5]), None, (
            "messages[0].content[0]", "expected a content part object, got integer",
            'send {"type": "text", "text": ...} or another part type')),
        (msg(role="user", content=[{"type": 5}]), None, (
            "messages[0].content[0].type", "a content part needs a string type",
            'set "type" to text, image_url, input_audio or file')),
        (msg(role="user", content=[{"type": "text", "text": 5}]), None, (
            "messages[0].content[0].text", "a text part needs a string text",
            "send the text as a string")),
        (msg(role="user", content=[{"type": "image_url", "image_url": {}}]), None, (
            "messages[0].content[0].image_url", "an image part needs a url",
            'send {"image_url": {"url": ...}}')),
        ({**P, "prompt": []}, None, (
            "prompt", "expected a string or a non-empty array, got array",
            "send a string, strings, token ids or arrays of token ids")),
        ({**P, "prompt": [1, -1]}, None, ("prompt[1]", "-1 is not a token id",
                                          "send non-negative integer token ids")),
        ({**P, "prompt": [1.5]}, None, ("prompt[0]", "1.5 is not a token id",
                                        "send non-negative integer token ids")),
        ({**P, "prompt": [["a"]]}, None, ("prompt", "nested prompts must be arrays of token ids",
                                          "send [[id, ...], ...]")),
        ({**P, "prompt": ["a", 1]}, None, ("prompt", "mixed prompt array",
                                           "send only strings or only token ids")),
        ({**C, "temperature": 3}, None, ("temperature", "3 is out of range",
                                         "use a value in [0, 2]")),
        ({**C, "top_p": 1.5}, None, ("top_p", "1.5 is out of range", "use a value in [0, 1]")),
        ({**P, "top_p": -0.1}, None, ("top_p", "-0.1 is out of range", "use a value in [0, 1]")),
        ({**C, "top_p": "x"}, None, ("top_p", "expected a number, got string", "send a number")),
        ({**C, "n": 0}, None, ("n", "0 is out of range", "use an integer [1, 128]")),
        ({**C, "n": 1.5}, None, ("n", "expected an integer, got 1.5", "send an integer")),
        ({**C, "max_tokens": -1}, None, ("max_tokens", "-1 is out of range",
                                         "use an integer >= 1")),
        ({**P, "best_of": 0}, None, ("best_of", "0 is out of range", "use an integer [1, 20]")),
        ({**C, "seed": True}, None, ("seed", "expected a number, got boolean", "send a number")),
        ({**C, "logprobs": 1}, None, ("logprobs", "expected a boolean, got integer",
                                      "send true or false")),
        ({**C, "stop": 5}, None, ("stop", "expected a string or an array, got integer",
                                  "send a string or an array of strings")),
        ({**C, "stop": ["a", 5]}, None, ("stop[1]", "expected a string, got integer",
                                         "send stop sequences as strings")),
        ({**C, "logit_bias": []}, None, ("logit_bias", "expected an object, got array",
                                         "map token ids to biases")),
        ({**C, "logit_bias": {"a": 1}}, None, (
            "logit_bias.a", "logit_bias keys are token ids",
            'write each id in ASCII decimal digits, e.g. "50256"')),
        ({**C, "tools": {}}, None, ("tools", "expected an array, got object",
                                    "send tools as an array")),
        ({**C, "tools": [5]}, None, ("tools[0]", "expected an object, got integer",
                                     "send each tool as an object")),
        ({**C, "response_format": "json"}, None, (
            "response_format", "expected an object, got string",
            'send {"type": "text"}, json_object or json_schema')),
        ({**C, "reasoning_effort": 5}, None, ("reasoning_effort", "expected a string, got integer",
                                              "send a string")),
        ({**C, "x": float("nan")}, None, ("x", "nan is not a finite number",
                                          "send a finite number")),
        ({**C, "x": {"y": [float("inf")]}}, None, ("x.y[0]", "inf is not a finite number",
                                                   "send a finite number")),
        ({**C, "x": 2**64}, None, ("x", "integer out of range", "use a 64-bit integer")),
        ({**C, "x": {1: 2}}, None, ("x", "object keys must be strings", "use string keys")),
        ({**C, "x": "\ud800"}, None, ("x", "text is not valid Unicode (a lone surrogate)",
                                      "send valid UTF-8 text")),
        ({**C, "x": {"y": "\ud800"}}, None, ("x.y", "text is not valid Unicode (a lone surrogate)",
                                             "send valid UTF-8 text")),
        ({**C, "x": object()}, None, ("x", "unsupported type object", "send JSON values only")),
        ({**C, "x": [None, True, 1.0, {}, ()]}, None, None),
    ])
    def test_the_refusal_reads(self, body: Any, kind: Any,
                               expected: tuple[str, str, str] | None) -> None:
        if expected is None:
            canonicalize(body, kind)
            return
        with pytest.raises(InvalidRequestError) as err:
            canonicalize(body, kind)
        assert (err.value.field, err.value.problem, err.value.fix) == expected
        assert str(err.value) == f"{expected[0]}: {expected[1]}; {expected[2]}"

    def test_a_request_over_the_key_limit_names_its_largest_field(self) -> None:
        with pytest.raises(RequestTooLargeError) as err:
            canonicalize({**C, "x": "a" * 5000, "y": "b" * 10}, None, KeyLimits(max_bytes=1000))
        assert err.value.field == "x"
        assert err.value.problem.startswith("request is ")
        assert err.value.problem.endswith(" bytes canonically, over the 1000-byte key limit")
        assert err.value.fix == "send a smaller request or raise the limit"


def keyed(body: dict[str, Any], name: str) -> Any:
    return canonicalize(body).fields[name]


def same_key(a: dict[str, Any], b: dict[str, Any]) -> bool:
    p = KeyParams(scope=ACME)
    return build_key(a, p).digest == build_key(b, p).digest


class TestPromptShapes:
    def test_two_token_rows_are_two_prompts_not_the_first(self) -> None:
        assert not same_key({**P, "prompt": [[1], [2]]}, {**P, "prompt": [1]})
        assert not same_key({**P, "prompt": [[1], [2]]}, {**P, "prompt": [[1]]})
        assert not same_key({**P, "prompt": [[1], [2]]}, {**P, "prompt": [1, 2]})

    def test_one_token_row_is_the_same_prompt_as_its_ids(self) -> None:
        assert same_key({**P, "prompt": [[1, 2]]}, {**P, "prompt": [1, 2]})

    def test_one_string_in_a_list_is_the_string_but_two_are_not_joined(self) -> None:
        assert same_key({**P, "prompt": ["ab"]}, {**P, "prompt": "ab"})
        assert not same_key({**P, "prompt": ["a", "b"]}, {**P, "prompt": "ab"})
        assert not same_key({**P, "prompt": ["a", "b"]}, {**P, "prompt": ["a"]})

    def test_integral_float_token_ids_are_the_ids(self) -> None:
        assert same_key({**P, "prompt": [1.0, 2.0]}, {**P, "prompt": [1, 2]})


class TestMessageShapes:
    def test_null_content_of_an_assistant_message_with_tool_calls_keys(self) -> None:
        call = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
        body = {**C, "messages": [{"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": None, "tool_calls": call}]}
        other = {**C, "messages": [{"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": "", "tool_calls": call}]}
        assert not same_key(body, other)
        assert canonicalize(body).fields["messages"] is not None

    def test_a_name_next_to_string_content_is_keyed(self) -> None:
        named = msg(role="user", content="hi", name="bob")
        assert not same_key(named, C)
        assert not same_key(named, msg(role="user", content="hi", name="eve"))

    def test_empty_or_null_tool_calls_and_name_are_absent(self) -> None:
        assert same_key(msg(role="user", content="hi", tool_calls=[]), C)
        assert same_key(msg(role="user", content="hi", name=None), C)

    def test_one_text_part_is_the_string_but_a_part_with_more_is_not(self) -> None:
        assert same_key(msg(role="user", content=[{"type": "text", "text": "hi"}]), C)
        assert not same_key(
            msg(role="user", content=[{"type": "text", "text": "hi", "cache": "x"}]), C)
        assert not same_key(msg(role="user", content=[{"type": "text", "text": "h"},
                                                      {"type": "text", "text": "i"}]), C)

    def test_an_image_given_as_a_url_string_is_the_url_object_with_detail_auto(self) -> None:
        short = msg(role="user", content=[{"type": "image_url", "image_url": "u"}])
        full = msg(role="user", content=[{"type": "image_url",
                                          "image_url": {"url": "u", "detail": "auto"}}])
        assert same_key(short, full)
        assert not same_key(short, msg(role="user", content=[
            {"type": "image_url", "image_url": {"url": "u", "detail": "high"}}]))

    def test_a_message_with_extra_keys_still_keys_its_role_and_content(self) -> None:
        a = msg(role="user", content="hi", x=1)
        assert not same_key(a, msg(role="user", content="ho", x=1))
        assert not same_key(a, msg(role="system", content="hi", x=1))

    def test_a_two_key_message_that_is_not_role_and_content_is_checked(self) -> None:
        with pytest.raises(InvalidRequestError, match="missing or non-string role"):
            canonicalize(msg(content="hi", name="x"))


class TestKeyedValues:
    def test_a_token_id_prompt_keys_as_its_json_and_a_string_prompt_as_the_string(self) -> None:
        assert canonicalize({**P, "prompt": [1, 2]}).keyed["prompt"] == msgpack.ExtType(
            1, b"[1,2]")
        assert canonicalize({**P, "prompt": ["p"]}).keyed["prompt"] == "p"

    def test_a_nested_float_at_minus_two_to_the_53_folds_to_the_int(self) -> None:
        v = canonicalize({"model": "m", "input": "x", "extra": [-(2.0**53), 2.0**53]})
        assert v.keyed["extra"] == msgpack.ExtType(
            1, b"[-9007199254740992,9007199254740992]")

    def test_a_float_subclass_at_two_to_the_53_folds_to_the_int(self) -> None:
        class F(float):
            pass

        assert canon_number(F(2.0**53), "x") == 2**53
        assert type(canon_number(F(2.0**53), "x")) is int

    def test_lists_nested_200_deep_around_a_read_only_map_key_like_the_plain_map(self) -> None:
        # a mapping that is not a dict takes the checked path, which counts the depth itself
        body = {"model": "m", "input": "x"}
        read_only = canonicalize({**body, "extra": nest_lists(MappingProxyType({"a": "b"}), 200)})
        plain = canonicalize({**body, "extra": nest_lists({"a": "b"}, 200)})
        assert read_only.keyed == plain.keyed

    def test_the_body_keeps_default_fields_unless_asked_for_the_minimal_one(self) -> None:
        request = canonicalize({**C, "temperature": 0})
        assert request.body()["top_p"] == 1
        assert "top_p" not in request.body(minimal=True)

    def test_a_logit_bias_key_that_is_not_a_string_is_refused_by_field(self) -> None:
        with pytest.raises(InvalidRequestError,
                           match=r"^logit_bias: object keys must be strings; use string keys$"):
            canonicalize({**C, "logit_bias": {50256: 1}})

    def test_a_body_key_that_is_not_a_string_is_refused_with_the_fix(self) -> None:
        with pytest.raises(InvalidRequestError,
                           match=r"^request: object keys must be strings; use string keys$"):
            canonicalize({**C, 5: "x"})

    @pytest.mark.parametrize(("field", "value", "message"), [
        ("n", 1.5, "n: expected an integer, got 1.5; send an integer"),
        ("n", 129, "n: 129 is out of range; use an integer [1, 128]"),
        ("max_tokens", 0, "max_tokens: 0 is out of range; use an integer >= 1"),
    ])
    def test_an_integer_field_s_refusal_names_the_field_and_its_range(
            self, field: str, value: Any, message: str) -> None:
        with pytest.raises(InvalidRequestError) as err:
            canonicalize({**C, field: value})
        assert str(err.value) == message
        assert err.value.field == field


class TestNumbersInNestedValues:
    def test_a_nan_that_is_a_nested_value_s_only_float_is_refused(self) -> None:
        with pytest.raises(InvalidRequestError, match="nan is not a finite number"):
            canonicalize({**C, "metadata_x": {"a": [1, "s", float("nan")]}})

    def test_integral_floats_fold_to_ints_inside_unknown_fields(self) -> None:
        assert same_key({**C, "x": {"a": [1.0, -0.0]}}, {**C, "x": {"a": [1, 0]}})
        assert not same_key({**C, "x": {"a": [1.5]}}, {**C, "x": {"a": [1]}})

    def test_floats_beyond_exact_integers_stay_floats(self) -> None:
        big = 2.0 ** 60
        assert not same_key({**C, "x": big}, {**C, "x": 2 ** 60})


class TestRangeLimits:
    @pytest.mark.parametrize(("body", "field", "value"), [
        (C, "top_p", 0), (C, "top_p", 1), (P, "top_p", 0), (P, "top_p", 1),
        (C, "temperature", 2), (C, "n", 128), (P, "best_of", 1), (P, "best_of", 20),
        (C, "frequency_penalty", -2), (C, "presence_penalty", 2), (C, "top_logprobs", 20),
        (P, "logprobs", 5), (P, "max_tokens", 0), (C, "max_tokens", 1),
    ])
    def test_a_value_at_the_end_of_its_range_is_accepted(self, body: dict, field: str,
                                                         value: Any) -> None:
        assert keyed({**body, field: value}, field) == value

    @pytest.mark.parametrize(("body", "field", "value"), [
        (C, "n", 129), (P, "best_of", 21), (C, "frequency_penalty", -2.5),
        (C, "presence_penalty", 2.5), (C, "top_logprobs", 21), (P, "logprobs", 6),
        (P, "max_tokens", -1), (C, "max_tokens", 0), (C, "temperature", -0.1),
    ])
    def test_a_value_past_the_end_of_its_range_is_refused_by_name(self, body: dict, field: str,
                                                                  value: Any) -> None:
        with pytest.raises(InvalidRequestError, match="is out of range") as err:
            canonicalize({**body, field: value})
        assert err.value.field == field


class TestToolChoiceAndHostedTools:
    def test_tool_choice_is_none_without_tools_and_auto_with_them(self) -> None:
        tool = {"type": "function", "function": {"name": "f"}}
        assert keyed(C, "tool_choice") == "none"
        assert keyed({**C, "tools": []}, "tool_choice") == "none"
        assert keyed({**C, "tools": [tool]}, "tool_choice") == "auto"

    def test_a_tool_given_as_a_read_only_mapping_keys_like_the_same_dict(self) -> None:
        tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
        assert keyed({**C, "tools": [MappingProxyType(tool)]}, "tools") == keyed(
            {**C, "tools": [tool]}, "tools")

    @pytest.mark.parametrize(("tools", "hosted"), [
        (None, False), ([], False), ([{"type": "function"}], False), ([{"type": "custom"}], False),
        ([{"type": "web_search"}], True), ([{"type": "function"}, {"type": "file_search"}], True),
        ([{}], True),
    ])
    def test_a_tool_the_provider_runs_is_hosted(self, tools: Any, hosted: bool) -> None:
        body = {**C, "temperature": 0} if tools is None else {**C, "temperature": 0, "tools": tools}
        request = canonicalize(body)
        assert request.hosted_tool is hosted
        assert (live_data(request) == "a hosted tool") is hosted


class TestKeyDigests:
    def test_the_material_digest_is_the_keyed_digest_of_this_request_s_material(self) -> None:
        a = build_key(chat(temperature=0), KeyParams(scope=ACME, secret=b"s1"))
        b = build_key(chat(temperature=0, seed=1), KeyParams(scope=ACME, secret=b"s1"))
        assert a.material_digest == material_digest(a.material, b"s1")
        assert a.material_digest != b.material_digest
        other = build_key(chat(temperature=0), KeyParams(scope=ACME, secret=b"s2"))
        assert (other.digest, other.material) == (a.digest, a.material)
        assert other.material_digest != a.material_digest

    def test_the_key_limit_in_the_params_is_the_one_applied(self) -> None:
        with pytest.raises(RequestTooLargeError, match="over the 100-byte key limit"):
            build_key(chat(x="a" * 200), KeyParams(scope=ACME, limits=KeyLimits(max_bytes=100)))

    def test_material_over_the_default_limit_rebuilds_when_it_was_built_under_a_raised_one(
            self) -> None:
        big = chat(temperature=0, x="a" * (8 * 1024 * 1024 + 1))
        k = build_key(big, KeyParams(scope=ACME, limits=KeyLimits(max_bytes=16 * 1024 * 1024)))
        assert rebuild_key(k.material).digest == k.digest


class TestFramingInAFreshThread:
    """Each thread keeps its own packer; a new thread builds one (the service's worker threads)."""

    def in_thread(self, fn: Any) -> Any:
        out: list[Any] = []
        t = threading.Thread(target=lambda: out.append(fn()))
        t.start()
        t.join()
        return out[0]

    def test_a_fresh_thread_frames_bytes_as_bin_and_each_value_alone(self) -> None:
        def two() -> tuple[bytes, bytes]:
            return frame_presorted([b"x", "y"]), frame_presorted(b"z")

        first, second = self.in_thread(two)
        assert first == msgpack.packb([b"x", "y"], use_bin_type=True)
        assert second == msgpack.packb(b"z", use_bin_type=True)

    def test_a_value_that_cannot_be_packed_leaves_the_thread_s_packer_usable(self) -> None:
        def bad_then_good() -> bytes:
            with pytest.raises(TypeError):
                frame_presorted([b"x", object()])
            return frame_presorted(b"z")

        assert self.in_thread(bad_then_good) == msgpack.packb(b"z", use_bin_type=True)
        with pytest.raises(TypeError):
            frame_presorted([b"x", object()])
        assert frame_presorted(b"z") == msgpack.packb(b"z", use_bin_type=True)


class TestFramingValues:
    def test_map_values_are_kept(self) -> None:
        assert frame({"a": 1, "b": [b"x"]}) == msgpack.packb({"a": 1, "b": [b"x"]},
                                                             use_bin_type=True)

    def test_a_str_or_int_subclass_frames_as_its_plain_value(self) -> None:
        class Tag(str):
            pass

        class Level(IntEnum):
            HIGH = 3

        assert frame([Tag("a"), Level.HIGH]) == frame(["a", 3])

    def test_a_block_hash_is_the_digest_of_its_framed_inputs(self) -> None:
        extra = (1, "", b"salt", "full")
        assert hash_block_tokens(xxh3_128, None, (1, 2), extra) == xxh3_128(
            msgpack.packb(["block/v1", None, [1, 2], [1, "", b"salt", "full"]], use_bin_type=True))


class TestTheRequestAsAWhole:
    """Written from the full mutation run of ``keying/canonical.py`` after the module split."""

    def test_a_read_only_mapping_body_keys_like_the_same_dict(self) -> None:
        body = chat(temperature=0)
        assert canonicalize(MappingProxyType(body)).encoded == canonicalize(body).encoded

    def test_a_request_exactly_at_the_byte_limit_is_keyed_and_one_byte_over_is_refused(
            self) -> None:
        size = len(canonicalize(chat()).encoded)
        assert canonicalize(chat(), limits=KeyLimits(max_bytes=size)).encoded
        with pytest.raises(RequestTooLargeError):
            canonicalize(chat(), limits=KeyLimits(max_bytes=size - 1))

    def test_the_model_is_not_a_keyed_field_of_any_kind(self) -> None:
        for body in (chat(), {"model": "m", "prompt": "hi"}, {"model": "m", "input": "hi"}):
            request = canonicalize(body)
            assert request.model == "m"
            assert "model" not in request.keyed

    def test_the_minimal_body_keeps_an_explicit_none_tool_choice_beside_tools(self) -> None:
        tool = {"type": "function", "function": {"name": "f"}}
        body = canonicalize(chat(tools=[tool], tool_choice="none")).body(minimal=True)
        assert body["tool_choice"] == "none" and body["tools"][0]["type"] == "function"
        # without tools, "none" is the derived default and is left out
        assert "tool_choice" not in canonicalize(chat()).body(minimal=True)

    def test_a_generic_request_s_minimal_body_is_its_whole_body(self) -> None:
        request = canonicalize({"model": "m", "input": "hi", "dimensions": 8})
        assert request.kind == "generic"
        assert request.body(minimal=True) == request.body() == {
            "model": "m", "input": "hi", "dimensions": 8}

    @pytest.mark.parametrize("tools", ["", {}, 0, "web_search", {"type": "function"}])
    def test_a_generic_request_s_tools_that_are_not_a_list_count_as_hosted(
            self, tools: Any) -> None:
        # fail closed: a shape we cannot read as client-run tools is a tool the provider runs
        assert canonicalize({"model": "m", "input": "x", "tools": tools}).hosted_tool is True

    @pytest.mark.parametrize(("tool", "hosted"), [
        (MappingProxyType({"type": "function"}), False),
        (MappingProxyType({"type": "web_search"}), True),
        ("function", True), (["function"], True),
    ])
    def test_a_generic_request_s_tool_is_hosted_unless_it_is_a_client_run_object(
            self, tool: Any, hosted: bool) -> None:
        assert canonicalize({"model": "m", "input": "x", "tools": [tool]}).hosted_tool is hosted


def nest_lists(leaf: Any, levels: int) -> Any:
    for _ in range(levels):
        leaf = [leaf]
    return leaf


def nest_maps(leaf: Any, levels: int) -> Any:
    for _ in range(levels):
        leaf = {"a": leaf}
    return leaf


@pytest.fixture
def deep_stack() -> Any:
    # NOTE: 255 nested containers take two frames a level on the checked path; under mutmut
    # every call goes through a trampoline too, which alone would pass Python's default limit.
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(max(before, 5000))
    yield
    sys.setrecursionlimit(before)


@pytest.mark.usefixtures("deep_stack")
class TestCanonicalJsonValues:
    """canon_value and canon_json on their own: the depth limit on each path, the exact refusal
    texts, and numbers that reach the checked path (subclasses) folding as plain ones do."""

    def test_lists_nested_past_the_limit_are_refused_like_maps(self) -> None:
        canonicalize({**C, "x": nest_lists(1.0, 254)})  # the limit itself is accepted
        with pytest.raises(RequestTooLargeError) as err:
            canonicalize({**C, "x": nest_lists(1.0, 255)})
        assert err.value.field == "x" + "[0]" * 254
        assert err.value.problem == "nested deeper than 254 levels"
        assert err.value.fix == "flatten the value"
        assert str(err.value) == f"{err.value.field}: nested deeper than 254 levels; " \
            "flatten the value"

    @pytest.mark.parametrize("nest", [nest_lists, nest_maps])
    def test_the_checked_path_accepts_exactly_254_containers(self, nest: Any) -> None:
        # a read-only map is not a dict, so the value takes the checked path, which counts the
        # depth itself
        leaf = MappingProxyType({"k": 1})
        canonicalize({**C, "x": nest(leaf, 253)})
        with pytest.raises(RequestTooLargeError, match=r"nested deeper than 254 levels"):
            canonicalize({**C, "x": nest(leaf, 254)})

    def test_the_checked_path_s_depth_refusal_names_the_field_and_the_fix(self) -> None:
        with pytest.raises(RequestTooLargeError) as err:
            canonicalize({**C, "x": nest_maps(MappingProxyType({}), 254)})
        assert str(err.value) == "x" + ".a" * 254 + ": nested deeper than 254 levels; " \
            "flatten the value"

    def test_a_lone_surrogate_deep_in_a_value_is_refused_as_text_not_as_depth(self) -> None:
        with pytest.raises(InvalidRequestError) as err:
            canonicalize({**C, "x": nest_lists("\ud800", 100)})
        assert not isinstance(err.value, RequestTooLargeError)
        assert str(err.value) == "x" + "[0]" * 100 + (
            ": text is not valid Unicode (a lone surrogate); send valid UTF-8 text")

    def test_an_empty_object_beside_a_folded_number_stays_an_empty_object(self) -> None:
        assert canon_value([{}, 1.0], "x") == [{}, 1]
        assert canon_value({"a": {}, "b": None}, "x") == {"a": {}, "b": None}
        assert canonicalize({**C, "x": {"a": {}, "b": 1.0}}).keyed["x"] == msgpack.ExtType(
            1, b'{"a":{},"b":1}')

    def test_an_object_with_only_non_string_keys_is_refused_by_canon_value(self) -> None:
        with pytest.raises(InvalidRequestError,
                           match=r"^x: object keys must be strings; use string keys$"):
            canon_value({1: 2}, "x")

    def test_a_value_that_is_not_json_is_refused_even_where_orjson_could_write_it(self) -> None:
        with pytest.raises(InvalidRequestError,
                           match=r"^x: unsupported type date; send JSON values only$"):
            canon_value(datetime.date(2020, 1, 1), "x")

    def test_a_float_at_two_to_the_53_folds_to_the_int(self) -> None:
        for v in (2.0**53, -(2.0**53)):
            assert canon_number(v, "x") == int(v)
            assert type(canon_number(v, "x")) is int
        assert type(canon_number(2.0**53 + 2, "x")) is float

    def test_an_int_subclass_folds_to_the_plain_int_across_the_whole_range(self) -> None:
        class I(int):  # noqa: E742
            pass

        for v in (-(2**63), 0, 7, 2**64 - 1):
            assert canon_number(I(v), "x") == v
            assert type(canon_number(I(v), "x")) is int
        for v in (-(2**63) - 1, 2**64):
            with pytest.raises(InvalidRequestError,
                               match=r"^x: integer out of range; use a 64-bit integer$"):
                canon_number(I(v), "x")

    def test_a_float_subclass_that_is_not_integral_stays_a_plain_float(self) -> None:
        class F(float):
            pass

        assert canon_number(F(1.5), "x") == 1.5
        assert type(canon_number(F(1.5), "x")) is float
        assert canon_number(F(2.0**60), "x") == 2.0**60
        assert type(canon_number(F(2.0**60), "x")) is float

    def test_a_fraction_inside_an_object_is_refused_not_kept(self) -> None:
        with pytest.raises(InvalidRequestError,
                           match=r"^x\.a: unsupported type Fraction; send JSON values only$"):
            canon_value({"a": fractions.Fraction(1, 2)}, "x")


SURROGATES: Any = {"a": "\ud800", "b": [1.0, {"c": "\udfff"}, ["\ud800", 2**64 - 1]],
                   "d": None, "e": True}


@pytest.mark.usefixtures("deep_stack")
class TestTextIsCheckedWhereTheFieldIsFramed:
    """canon_value folds a value in one fast walk that does not encode every string: a lone
    surrogate comes back as it was and is refused where the field is framed, by its path."""

    def test_a_lone_surrogate_comes_back_from_canon_value_unchanged(self) -> None:
        assert canon_value(SURROGATES, "x") == {
            "a": "\ud800", "b": [1, {"c": "\udfff"}, ["\ud800", 2**64 - 1]],
            "d": None, "e": True}

    @pytest.mark.parametrize("nest", [nest_lists, nest_maps])
    def test_a_lone_surrogate_254_containers_deep_comes_back_unchanged(self, nest: Any) -> None:
        assert canon_value(nest(["\ud800", 1.0], 253), "x") == nest(["\ud800", 1], 253)

    def test_the_framed_field_refuses_the_lone_surrogate_by_its_path(self) -> None:
        with pytest.raises(InvalidRequestError) as err:
            canonicalize({**C, "x": SURROGATES})
        assert str(err.value) == (
            "x.a: text is not valid Unicode (a lone surrogate); send valid UTF-8 text")


def refusal(norm: Any, v: Any, path: str = "f") -> str:
    with pytest.raises(InvalidRequestError) as err:
        norm(v, path)
    assert err.value.field == path
    return str(err.value)


class TestFieldNormalisersFromTheTable:
    """The normalisers built from keying.fields (a bounded number, a bounded or open integer, a
    nullable one, the other types) and the canonical defaults built from them: each bound is
    inclusive, and each refusal names the field, the value and the accepted range."""

    def test_a_bounded_number_accepts_its_ends_and_names_the_range_past_them(self) -> None:
        norm = _number_in(0, 2)
        assert (norm(0, "f"), norm(2, "f"), norm(2.0, "f"), norm(1.5, "f")) == (0, 2, 2, 1.5)
        assert refusal(norm, 2.5) == "f: 2.5 is out of range; use a value in [0, 2]"
        assert refusal(norm, -1) == "f: -1 is out of range; use a value in [0, 2]"
        assert refusal(norm, "x") == "f: expected a number, got string; send a number"

    def test_a_bounded_integer_accepts_its_ends_and_names_the_range_past_them(self) -> None:
        norm = _int_in(1, 3)
        assert (norm(1, "f"), norm(3, "f"), norm(2.0, "f")) == (1, 3, 2)
        assert type(norm(2.0, "f")) is int
        assert refusal(norm, 0) == "f: 0 is out of range; use an integer [1, 3]"
        assert refusal(norm, 4) == "f: 4 is out of range; use an integer [1, 3]"
        assert refusal(norm, 1.5) == "f: expected an integer, got 1.5; send an integer"
        assert refusal(norm, None) == "f: expected a number, got null; send a number"
        assert refusal(norm, "2") == "f: expected a number, got string; send a number"

    def test_an_open_integer_has_only_a_lower_bound(self) -> None:
        norm = _int_in(1, None)
        assert norm(1, "f") == 1
        assert norm(2**63, "f") == 2**63
        assert refusal(norm, 0) == "f: 0 is out of range; use an integer >= 1"

    def test_a_nullable_integer_keeps_null_and_still_checks_numbers(self) -> None:
        norm = _int_in(0, 5, nullable=True)
        assert norm(None, "f") is None
        assert norm(5, "f") == 5
        assert norm(0, "f") == 0
        assert refusal(norm, 6) == "f: 6 is out of range; use an integer [0, 5]"

    def test_each_keyed_type_gets_its_default_and_normaliser(self) -> None:
        number = _spec(Keyed(type="number", default=1, lo=0, hi=2))
        assert number.default == 1
        assert number.norm(2, "f") == 2
        assert refusal(number.norm, 3) == "f: 3 is out of range; use a value in [0, 2]"
        integer = _spec(Keyed(type="integer", default=4, lo=1, hi=5))
        assert integer.default == 4
        assert integer.norm(5, "f") == 5
        assert refusal(integer.norm, 6) == "f: 6 is out of range; use an integer [1, 5]"
        assert refusal(integer.norm, None) == "f: expected a number, got null; send a number"
        nullable = _spec(Keyed(type="integer", lo=1, nullable=True))
        assert nullable.default is None
        assert nullable.norm(None, "f") is None
        assert nullable.norm(10**12, "f") == 10**12
        assert refusal(nullable.norm, 0) == "f: 0 is out of range; use an integer >= 1"
        boolean = _spec(Keyed(type="boolean", default=False))
        assert boolean.default is False
        assert boolean.norm(True, "f") is True
        assert refusal(boolean.norm, 1) == "f: expected a boolean, got integer; send true or false"

    @pytest.mark.parametrize(("k", "message"), [
        (Keyed(type="number", lo=0), "a number field needs both bounds"),
        (Keyed(type="number", hi=1), "a number field needs both bounds"),
        (Keyed(type="integer", hi=1), "an integer field needs a lower bound"),
    ])
    def test_a_field_table_entry_without_its_bounds_is_a_programming_error(
            self, k: Keyed, message: str) -> None:
        with pytest.raises(AssertionError) as err:
            _spec(k)
        assert str(err.value) == message

    def test_the_defaults_are_each_field_s_normalised_default_in_key_order(self) -> None:
        specs = {
            "b": _Spec(2.0, _number_in(0, 2)),
            "a": _Spec(None, _messages),  # required: its null default is refused
            "c": _Spec(None, _int_in(1, None, nullable=True)),
            "d": _Spec(None, _stop),
        }
        out = _defaults(specs)
        assert list(out) == ["a", "b", "c", "d"]
        assert out == {"a": None, "b": 2, "c": None, "d": msgpack.ExtType(1, b"[]")}
        assert type(out["b"]) is int


class TestNormaliserRefusalsAndEdges:
    @pytest.mark.parametrize("key", ["-9223372036854775808", "18446744073709551615", "0"])
    def test_a_logit_bias_id_at_either_end_of_the_64_bit_range_is_accepted(self,
                                                                            key: str) -> None:
        keyed_bias = canonicalize({**C, "logit_bias": {key: 1}}).keyed["logit_bias"]
        assert keyed_bias == msgpack.ExtType(1, b'{"%s":1}' % key.encode())

    @pytest.mark.parametrize("key", ["-9223372036854775809", "18446744073709551616"])
    def test_a_logit_bias_id_past_the_64_bit_range_is_refused(self, key: str) -> None:
        with pytest.raises(InvalidRequestError) as err:
            canonicalize({**C, "logit_bias": {key: 1}})
        assert str(err.value) == (f'logit_bias.{key}: logit_bias keys are token ids; '
                                  'write each id in ASCII decimal digits, e.g. "50256"')

    def test_a_logit_bias_accepts_minus_and_plus_100_and_names_the_range_past_them(
            self) -> None:
        assert canonicalize({**C, "logit_bias": {"1": -100, "2": 100}}).keyed["logit_bias"] == (
            msgpack.ExtType(1, b'{"1":-100,"2":100}'))
        for bias in (-101, 100.5):
            with pytest.raises(InvalidRequestError) as err:
                canonicalize({**C, "logit_bias": {"7": bias}})
            assert str(err.value) == f"logit_bias.7: {bias} is out of range; " \
                "use a value in [-100, 100]"

    @pytest.mark.parametrize("role", [5, ["user"], {"r": 1}])
    def test_a_message_whose_role_is_not_a_string_is_refused(self, role: Any) -> None:
        for extra in ({}, {"name": "n"}):
            with pytest.raises(InvalidRequestError) as err:
                canonicalize({**C, "messages": [{"role": role, "content": "x", **extra}]})
            assert str(err.value) == ("messages[0].role: missing or non-string role; "
                                      "set role to system, developer, user, assistant or tool")

    def test_a_read_only_message_keys_like_the_plain_one(self) -> None:
        m = {"role": "user", "content": "hi", "name": "n"}
        assert canonicalize({**C, "messages": [MappingProxyType(m)]}).keyed == (
            canonicalize({**C, "messages": [m]}).keyed)

    @pytest.mark.parametrize(("body", "message"), [
        ({**C, "messages": [{"role": "user", "content": "x", "x": float("nan")}]},
         "messages[0].x: nan is not a finite number; send a finite number"),
        ({**C, "messages": [{"role": "user", "content": "a\ud800", "name": "n"}]},
         "messages[0].content: text is not valid Unicode (a lone surrogate); "
         "send valid UTF-8 text"),
        ({**P, "prompt": ["a", "b\ud800"]},
         "prompt[1]: text is not valid Unicode (a lone surrogate); send valid UTF-8 text"),
        ({**P, "prompt": [1, float("nan")]},
         "prompt[1]: nan is not a finite number; send a finite number"),
        ({**P, "prompt": [[1, 2], [3, -1]]},
         "prompt[1][1]: -1 is not a token id; send non-negative integer token ids"),
        ({**C, "response_format": {"type": "json_object", "x": float("inf")}},
         "response_format.x: inf is not a finite number; send a finite number"),
        ({**C, "stop": "a\ud800"},
         "stop[0]: text is not valid Unicode (a lone surrogate); send valid UTF-8 text"),
        ({**C, "stop": ["b", "a\ud800"]},
         "stop[0]: text is not valid Unicode (a lone surrogate); send valid UTF-8 text"),
        ({**C, "tools": [{"type": "function", "function": {"name": "f", "x": float("nan")}}]},
         "tools[0].function.x: nan is not a finite number; send a finite number"),
        # a float is "number" and None "null" in the refusal's words
        ({**C, "reasoning_effort": 1.5},
         "reasoning_effort: expected a string, got number; send a string"),
        ({**C, "messages": [None]},
         "messages[0]: expected an object, got null; send each message as {role, content}"),
    ])
    def test_a_refusal_deep_in_a_field_names_its_path(self, body: Any, message: str) -> None:
        with pytest.raises(InvalidRequestError) as err:
            canonicalize(body)
        assert str(err.value) == message

    def test_a_read_only_function_without_strict_keys_like_strict_false(self) -> None:
        def tool(fn: Any) -> dict[str, Any]:
            return {**C, "tools": [{"type": "function", "function": fn}]}

        assert canonicalize(tool(MappingProxyType({"name": "f"}))).keyed == (
            canonicalize(tool({"name": "f", "strict": False})).keyed)
