"""The canonical form: defaults made explicit, spellings folded, meanings kept apart.

Each ``TestWrongAnswerClass`` test is a regression for a way public caches served wrong answers.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest

from keying import (
    InvalidRequestError,
    KeyLimits,
    KeyParams,
    RequestTooLargeError,
    Scope,
    build_key,
    canonicalize,
)

ACME = Scope.for_tenant("acme")


def chat(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    body.update(fields)
    return body


def key(body: dict[str, Any], **params: Any) -> bytes:
    params.setdefault("scope", ACME)
    return build_key(body, KeyParams(**params)).digest


class TestDefaults:
    def test_omitted_temperature_is_one_not_zero(self) -> None:
        assert canonicalize(chat()).fields["temperature"] == 1
        assert key(chat()) == key(chat(temperature=1.0))
        assert key(chat()) != key(chat(temperature=0))

    def test_every_known_chat_field_is_present_with_its_default(self) -> None:
        fields = canonicalize(chat()).fields
        for name in ("top_p", "n", "max_tokens", "seed", "stop", "tools", "tool_choice",
                     "response_format", "logit_bias", "presence_penalty", "frequency_penalty",
                     "reasoning_effort", "parallel_tool_calls", "logprobs"):
            assert name in fields, name

    def test_explicit_null_equals_omitted(self) -> None:
        assert key(chat(seed=None, stop=None, tools=None, max_tokens=None)) == key(chat())

    def test_completion_max_tokens_defaults_to_sixteen(self) -> None:
        body = {"model": "m", "prompt": "p"}
        assert canonicalize(body).fields["max_tokens"] == 16
        assert key(body) == key({**body, "max_tokens": 16})
        assert key(body) != key({**body, "max_tokens": 17})

    def test_tool_choice_default_depends_on_tools(self) -> None:
        tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
        assert canonicalize(chat()).fields["tool_choice"] == "none"
        assert canonicalize(chat(tools=[tool])).fields["tool_choice"] == "auto"
        assert key(chat(tools=[tool])) == key(chat(tools=[tool], tool_choice="auto"))
        assert key(chat(tools=[tool])) != key(chat(tools=[tool], tool_choice="required"))

    def test_function_strict_false_equals_omitted(self) -> None:
        f = {"name": "f", "parameters": {"type": "object"}}
        a = chat(tools=[{"type": "function", "function": f}])
        b = chat(tools=[{"type": "function", "function": {**f, "strict": False}}])
        c = chat(tools=[{"type": "function", "function": {**f, "strict": True}}])
        assert key(a) == key(b) != key(c)


class TestEquivalentSpellings:
    def test_string_content_equals_one_text_part(self) -> None:
        parts = chat(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
        assert key(parts) == key(chat())

    def test_two_text_parts_do_not_fold_into_one_string(self) -> None:
        two = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]
        assert key(chat(messages=[{"role": "user", "content": two}])) != key(chat())

    def test_int_and_float_spellings_fold(self) -> None:
        assert key(chat(temperature=0, seed=3)) == key(chat(temperature=0.0, seed=3.0))

    def test_negative_zero_folds(self) -> None:
        assert key(chat(temperature=-0.0)) == key(chat(temperature=0))
        assert key(chat(x_custom=-0.0)) == key(chat(x_custom=0))

    def test_object_key_order_does_not_matter(self) -> None:
        a = {"model": "m", "temperature": 0, "messages": [{"content": "hi", "role": "user"}]}
        b = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "model": "m"}
        assert key(a) == key(b)

    def test_stop_string_list_and_set_order_fold(self) -> None:
        assert key(chat(stop="x")) == key(chat(stop=["x"]))
        assert key(chat(stop=["a", "b"])) == key(chat(stop=["b", "a", "a"]))

    def test_single_prompt_list_equals_prompt_string(self) -> None:
        assert key({"model": "m", "prompt": ["p"]}) == key({"model": "m", "prompt": "p"})

    def test_image_detail_auto_is_the_default(self) -> None:
        def img(**extra: Any) -> dict[str, Any]:
            part = {"type": "image_url", "image_url": {"url": "data:x", **extra}}
            return chat(messages=[{"role": "user", "content": [part]}])

        assert key(img()) == key(img(detail="auto")) != key(img(detail="high"))


class TestDifferentMeanings:
    def test_message_order_matters(self) -> None:
        a = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        assert key(chat(messages=a)) != key(chat(messages=list(reversed(a))))

    def test_tool_order_matters(self) -> None:
        t1 = {"type": "function", "function": {"name": "a"}}
        t2 = {"type": "function", "function": {"name": "b"}}
        assert key(chat(tools=[t1, t2])) != key(chat(tools=[t2, t1]))

    def test_whitespace_inside_text_matters(self) -> None:
        assert key(chat(messages=[{"role": "user", "content": "hi "}])) != key(chat())

    def test_different_stop_set_matters(self) -> None:
        assert key(chat(stop=["a"])) != key(chat(stop=["a", "b"]))

    def test_true_is_not_one(self) -> None:
        assert key(chat(x_flag=True)) != key(chat(x_flag=1))

    def test_role_matters(self) -> None:
        assert key(chat(messages=[{"role": "system", "content": "hi"}])) != key(chat())

    def test_chat_and_completion_never_share(self) -> None:
        assert key({"model": "m", "prompt": "x"}, kind="generic") != key(
            {"model": "m", "prompt": "x"}
        )


class TestUnknownAndUnkeyedFields:
    def test_unknown_fields_are_keyed(self) -> None:
        assert key(chat(top_k=40)) != key(chat())
        assert key(chat(top_k=40)) != key(chat(top_k=41))
        assert canonicalize(chat(top_k=40)).fields["top_k"] == 40

    def test_unkeyed_fields_are_ignored_and_reported(self) -> None:
        body = chat(stream=True, user="u1", metadata={"a": "b"}, store=True, request_id="r")
        assert key(body) == key(chat())
        assert canonicalize(body).unkeyed == ("metadata", "request_id", "store", "stream", "user")


class TestCacheability:
    def test_sampling_without_seed_bypasses(self) -> None:
        r = build_key(chat(), KeyParams(scope=ACME))
        assert not r.cacheability.cacheable
        assert "temperature=1" in r.cacheability.reason

    def test_greedy_is_cacheable(self) -> None:
        r = build_key(chat(temperature=0), KeyParams(scope=ACME))
        assert r.cacheability.cacheable

    def test_seeded_sampling_is_cacheable(self) -> None:
        r = build_key(chat(temperature=0.7, seed=1), KeyParams(scope=ACME))
        assert r.cacheability.cacheable and "seed" in r.cacheability.reason

    def test_n_above_one_without_seed_bypasses(self) -> None:
        r = build_key(chat(temperature=0, n=2), KeyParams(scope=ACME))
        assert not r.cacheability.cacheable and "n=2" in r.cacheability.reason

    def test_best_of_without_seed_bypasses(self) -> None:
        r = build_key({"model": "m", "prompt": "p", "temperature": 0, "best_of": 3},
                      KeyParams(scope=ACME))
        assert not r.cacheability.cacheable and "best_of" in r.cacheability.reason

    @pytest.mark.parametrize(("body", "rule"), [
        (chat(web_search_options={}), "web_search_options"),
        (chat(search_parameters={"mode": "auto"}), "search_parameters"),
        (chat(plugins=[{"id": "web"}]), "plugins"),
        (chat(plugins=[{"id": "file-parser"}]), "plugins"),
        ({**chat(), "model": "openai/gpt-4o:online"}, ":online"),
        (chat(tools=[{"type": "web_search"}]), "hosted tool"),
        (chat(tools=[{"type": "web_search_preview"}]), "hosted tool"),
        (chat(tools=[{"type": "file_search", "vector_store_ids": ["v"]}]), "hosted tool"),
        (chat(tools=[{"type": "mcp", "server_url": "https://x"}]), "hosted tool"),
        (chat(tools=[{"type": "web_search_20250305", "name": "web_search"}]), "hosted tool"),
        (chat(tools=[{"type": "function", "function": {"name": "f"}},
                     {"type": "code_interpreter"}]), "hosted tool"),
        ({"model": "m", "prompt": "p", "temperature": 0, "plugins": [{"id": "web"}]},
         "plugins"),
    ])
    def test_every_live_data_rule_bypasses_even_when_greedy_and_opted_in(
            self, body: dict[str, Any], rule: str) -> None:
        for opted_in in (False, True):
            r = build_key({**body, "temperature": 0},
                          KeyParams(scope=ACME, allow_nondeterministic=opted_in))
            assert not r.cacheability.cacheable, body
            assert r.cacheability.reason.startswith("live data") and rule in \
                r.cacheability.reason

    @pytest.mark.parametrize("body", [
        chat(tools=[{"type": "function", "function": {"name": "f"}}]),
        chat(tools=[{"type": "custom", "custom": {"name": "grammar"}}]),
        chat(plugins=[], web_search_options=None, search_parameters=None),
        {**chat(), "model": "online-model"},
    ])
    def test_requests_that_only_look_like_live_data_are_cached(self, body: dict[str, Any]
                                                                ) -> None:
        assert build_key({**body, "temperature": 0}, KeyParams(scope=ACME)).cacheability.cacheable

    def test_tenant_can_opt_in(self) -> None:
        r = build_key(chat(), KeyParams(scope=ACME, allow_nondeterministic=True))
        assert r.cacheability.cacheable and r.cacheability.reason.startswith("opted in")
        assert not r.cacheability.reproducible  # cacheable, but a recompute may differ

    def test_greedy_and_seeded_requests_are_reproducible(self) -> None:
        for body in (chat(temperature=0), chat(temperature=0.7, seed=3)):
            assert build_key(body, KeyParams(scope=ACME)).cacheability.reproducible, body


class TestInvalidInput:
    @pytest.mark.parametrize(
        ("body", "field"),
        [
            (chat(temperature=math.nan), "temperature"),
            (chat(temperature=math.inf), "temperature"),
            (chat(x_extra=[1.0, math.nan]), r"x_extra\[1\]"),
            (chat(temperature="0"), "temperature"),
            (chat(temperature=3), "temperature"),
            (chat(n=0), "n"),
            (chat(n=1.5), "n"),
            (chat(max_tokens=True), "max_tokens"),
            (chat(messages="hi"), "messages"),
            (chat(messages=[]), "messages"),
            (chat(messages=[{"content": "x"}]), r"messages\[0\].role"),
            (chat(messages=[{"role": "user", "content": 5}]), r"messages\[0\].content"),
            (chat(stop=[1]), r"stop\[0\]"),
            (chat(logit_bias={"abc": 1}), "logit_bias.abc"),
            # str.isdigit() passes these; int() raises on the first and folds the rest
            (chat(logit_bias={"--5": 1}), "logit_bias.--5"),
            (chat(logit_bias={"\u00b2": 1}), "logit_bias.\u00b2"),
            (chat(logit_bias={"\u0663": 1}), "logit_bias.\u0663"),
            (chat(logit_bias={" 3": 1}), "logit_bias. 3"),
            (chat(logit_bias={"03": 1}), "logit_bias.03"),
            (chat(logit_bias={"1" * 21: 1}), "logit_bias.1{21}"),
            (chat(logit_bias={"1": 101}), "logit_bias.1"),
            ({"messages": [{"role": "user", "content": "x"}]}, "model"),
            ({"model": "", "prompt": "x"}, "model"),
            ({"model": "m", "prompt": [1, "a"]}, "prompt"),
            (chat(x_big=2**70), "x_big"),
        ],
    )
    def test_invalid_field_is_named(self, body: dict[str, Any], field: str) -> None:
        with pytest.raises(InvalidRequestError, match=f"^{field}: "):
            canonicalize(body)

    def test_not_an_object(self) -> None:
        with pytest.raises(InvalidRequestError, match=r"^request: expected a JSON object"):
            canonicalize([1, 2])

    def test_oversize_request_is_refused(self) -> None:
        body = chat(messages=[{"role": "user", "content": "x" * 2000}])
        with pytest.raises(RequestTooLargeError, match="1000-byte key limit"):
            canonicalize(body, limits=KeyLimits(max_bytes=1000))

    @pytest.mark.parametrize("with_float", [False, True])
    def test_deep_nesting_is_refused_on_every_path(self, with_float: bool) -> None:
        deep: Any = 1.5 if with_float else 1
        for _ in range(254):
            deep = {"a": deep}
        canonicalize(chat(x_deep=deep))  # the limit itself is accepted
        with pytest.raises(RequestTooLargeError, match="nested deeper than 254"):
            canonicalize(chat(x_deep={"b": deep}))

    def test_lone_surrogate_is_refused_with_the_field(self) -> None:
        with pytest.raises(InvalidRequestError, match=r"^messages\[0\].content: text is not valid"):
            canonicalize(chat(messages=[{"role": "user", "content": "a\ud800"}]))
        with pytest.raises(InvalidRequestError, match=r"^x_meta.k: text is not valid"):
            canonicalize(chat(x_meta={"k": "\udfff"}))
        with pytest.raises(InvalidRequestError, match=r"^prompt: text is not valid"):
            canonicalize({"model": "m", "prompt": "a\ud800"})
        with pytest.raises(InvalidRequestError, match=r"^x_note: text is not valid"):
            canonicalize(chat(x_note="\udfff"))

    def test_canonicalize_does_not_mutate_the_input(self) -> None:
        body = chat(stop="x", tools=[{"type": "function", "function": {"name": "f"}}],
                    messages=[{"role": "user", "content": [{"type": "text", "text": "a"}]}])
        before = copy.deepcopy(body)
        canonicalize(body)
        assert body == before


class TestWrongAnswerClass:
    """One regression per way a public cache served a wrong answer."""

    @pytest.mark.parametrize(
        ("field", "a", "b"),
        [
            ("max_tokens", 10, 11),
            ("seed", 1, 2),
            ("top_k", 1, 40),
            ("tool_choice", "auto", "required"),
            ("reasoning_effort", "low", "high"),
            ("x_provider_option", {"safe": True}, {"safe": False}),
        ],
    )
    def test_parameter_missing_from_key(self, field: str, a: Any, b: Any) -> None:
        assert key(chat(**{field: a})) != key(chat(**{field: b}))

    def test_image_in_the_key(self) -> None:
        def img(url: str) -> dict[str, Any]:
            parts = [{"type": "text", "text": "what?"},
                     {"type": "image_url", "image_url": {"url": url}}]
            return chat(messages=[{"role": "user", "content": parts}])

        assert key(img("data:image/png;base64,AAAA")) != key(img("data:image/png;base64,AAAB"))

    def test_omitted_temperature_not_treated_as_zero(self) -> None:
        assert key(chat()) != key(chat(temperature=0))

    def test_keyword_order_independent(self) -> None:
        assert key({"temperature": 0, **chat()}) == key({**chat(), "temperature": 0})

    def test_unframed_concatenation_collision(self) -> None:
        a = key(chat(), scope=Scope.for_user("org_1", "2345"))
        b = key(chat(), scope=Scope.for_user("org_12345", "x"))
        c = key(chat(messages=[{"role": "user", "content": "hi"}], x_org="org_1", x_id="2345"))
        d = key(chat(messages=[{"role": "user", "content": "hi"}], x_org="org_12345", x_id=""))
        assert a != b and c != d

    def test_collision_resistant_verification_digest(self) -> None:
        r = build_key(chat(temperature=0), KeyParams(scope=ACME))
        assert len(r.digest) == 16 and len(r.material_digest) == 32
        other = build_key(chat(temperature=0), KeyParams(scope=ACME, secret=b"another-secret"))
        assert other.digest == r.digest and other.material_digest != r.material_digest


class TestHostedToolReading:
    @pytest.mark.parametrize("tools", [
        None, [], [{"type": "function", "function": {"name": "f"}}],
        [{"type": "custom", "custom": {"name": "c"}}],
        [{"type": "function", "function": {"name": "f"}}, {"type": "web_search"}],
        [{"type": "code_interpreter"}], [{"function": {"name": "no type"}}],
    ])
    @pytest.mark.parametrize("kind", ["chat", "generic"])
    def test_the_verdict_read_while_canonicalising_is_the_one_the_canonical_tools_give(
            self, tools, kind):
        import orjson

        from keying.canonical import CLIENT_TOOL_TYPES, canonicalize

        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": tools}
        c = canonicalize(body, kind)
        keyed = c.keyed.get("tools")
        value = orjson.loads(keyed.data) if keyed is not None and hasattr(keyed, "data") else keyed
        from_canonical = value not in (None, []) and (not isinstance(value, list) or any(
            not isinstance(t, dict) or t.get("type") not in CLIENT_TOOL_TYPES for t in value))
        assert c.hosted_tool == from_canonical
