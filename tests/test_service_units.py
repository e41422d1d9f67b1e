"""The service's building blocks, without HTTP: breaker, fill tokens, Cache-Control,
single-flight, stream conversion, memo tables, settings and tenants."""

from __future__ import annotations

import asyncio
import os
import re
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cachesvc.breaker import CircuitBreaker
from cachesvc.cache_control import parse_cache_control
from cachesvc.errors import AuthError, BadRequestError, UnprocessableError
from cachesvc.fill_token import FillTokenSigner
from cachesvc.memo import Memo
from cachesvc.settings import ConfigError, load_settings, with_demo_tenant
from cachesvc.single_flight import SingleFlight
from cachesvc.streaming import body_to_chunks, chunks_to_body, stream_complete
from cachesvc.tenants import TenantDirectory
from tests.support.clock import FakeClock


class TestCircuitBreaker:
    def test_it_opens_after_the_configured_failures_in_a_row(self):
        b = CircuitBreaker(failures=3, reset_after_s=1, clock=FakeClock())
        for _ in range(2):
            b.failure()
        assert b.allow() and b.state == "closed"
        b.failure()
        assert b.state == "open" and not b.allow()

    def test_a_success_resets_the_count(self):
        b = CircuitBreaker(failures=2, reset_after_s=1, clock=FakeClock())
        b.failure()
        b.success()
        b.failure()
        assert b.state == "closed"

    def test_after_the_reset_time_exactly_one_probe_goes_through(self):
        clock = FakeClock()
        b = CircuitBreaker(failures=1, reset_after_s=2, clock=clock)
        b.failure()
        clock.now += 1.9
        assert not b.allow()
        clock.now += 0.2
        assert b.allow() and not b.allow()
        b.success()
        assert b.state == "closed" and b.allow()

    def test_a_failed_probe_reopens_for_another_period(self):
        clock = FakeClock()
        b = CircuitBreaker(failures=1, reset_after_s=2, clock=clock)
        b.failure()
        clock.now += 2
        assert b.allow()
        b.failure()
        assert b.state == "open" and not b.allow()

    def test_state_changes_are_reported(self):
        seen: list[str] = []
        clock = FakeClock()
        b = CircuitBreaker(failures=1, reset_after_s=1, clock=clock, on_change=seen.append)
        b.failure()
        clock.now += 1
        b.allow()
        b.success()
        assert seen == ["open", "half_open", "closed"]

    @pytest.mark.parametrize("kw", [{"failures": 0}, {"reset_after_s": 0}])
    def test_nonsense_settings_are_refused(self, kw):
        with pytest.raises(ValueError, match="must be"):
            CircuitBreaker(**kw)


class BreakerMachine(RuleBasedStateMachine):
    """The breaker against a plain model of its rules."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.b = CircuitBreaker(failures=3, reset_after_s=5, clock=self.clock)
        self.consecutive = 0
        self.opened_at: float | None = None
        self.probing = False

    def model_state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half_open" if self.clock.now - self.opened_at >= 5 else "open"

    @rule(dt=st.floats(0, 7))
    def wait(self, dt: float) -> None:
        self.clock.now += dt

    @rule()
    def allow(self) -> None:
        state = self.model_state()
        expected = state == "closed" or (state == "half_open" and not self.probing)
        if state == "half_open" and expected:
            self.probing = True
        assert self.b.allow() == expected

    @rule()
    def success(self) -> None:
        self.b.success()
        self.consecutive, self.opened_at, self.probing = 0, None, False

    @rule()
    def failure(self) -> None:
        self.b.failure()
        state = self.model_state()
        self.consecutive += 1
        self.probing = False
        if state == "half_open" or self.consecutive >= 3:
            self.opened_at = self.clock.now

    @invariant()
    def agrees(self) -> None:
        self.b.check_valid()
        assert self.b.state == self.model_state()


TestBreakerAgainstModel = BreakerMachine.TestCase
TestBreakerAgainstModel.settings = settings(max_examples=60, stateful_step_count=30,
                                            deadline=None)


class TestFillTokens:
    def grant(self, signer: FillTokenSigner, **over: Any) -> str:
        fields = dict(tenant="t", scope=["tenant", "t", None], digest=b"\x01" * 16,
                      material_digest=b"\x02" * 32, model="m", epoch=7, stream=False,
                      ttl_seconds=60)
        fields.update(over)
        return signer.sign(**fields)

    def test_a_signed_token_verifies_to_what_it_binds(self):
        s = FillTokenSigner(b"k" * 32, clock=FakeClock())
        g = s.verify(self.grant(s))
        assert (g.tenant, g.digest, g.material_digest, g.model, g.epoch) == (
            "t", b"\x01" * 16, b"\x02" * 32, "m", 7)

    def test_any_changed_byte_is_refused(self):
        s = FillTokenSigner(b"k" * 32, clock=FakeClock())
        token = self.grant(s)
        for i in range(0, len(token), 7):
            if token[i] == ".":
                continue
            bad = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1:]
            with pytest.raises(UnprocessableError, match="fill_token"):
                s.verify(bad)

    def test_another_secret_does_not_verify(self):
        a = FillTokenSigner(b"a" * 32, clock=FakeClock())
        b = FillTokenSigner(b"b" * 32, clock=FakeClock())
        with pytest.raises(UnprocessableError, match="invalid signature"):
            b.verify(self.grant(a))

    def test_a_token_signed_before_a_rotation_still_verifies(self):
        old = FillTokenSigner(b"a" * 32, clock=FakeClock())
        rotated = FillTokenSigner(b"b" * 32, previous=[b"a" * 32], clock=FakeClock())
        assert rotated.verify(self.grant(old)).model == "m"
        with pytest.raises(UnprocessableError, match="invalid signature"):
            old.verify(self.grant(rotated))  # new tokens are signed under the new secret

    def test_an_expired_token_is_refused(self):
        clock = FakeClock()
        s = FillTokenSigner(b"k" * 32, ttl_s=10, clock=clock)
        token = self.grant(s)
        clock.now += 11
        with pytest.raises(UnprocessableError, match="expired"):
            s.verify(token)

    @pytest.mark.parametrize("junk", ["", "x", "a.b.c", 5, None, "YQ.YQ"])
    def test_junk_is_refused_with_the_field_named(self, junk):
        s = FillTokenSigner(b"k" * 32)
        with pytest.raises(UnprocessableError) as info:
            s.verify(junk)
        assert info.value.field == "fill_token"


class TestCacheControl:
    def test_directives_are_parsed(self):
        cc = parse_cache_control('No-Cache, no-store, max-age="30", only-if-cached, foo=1')
        assert (cc.no_cache, cc.no_store, cc.max_age, cc.only_if_cached) == (True, True, 30, True)

    def test_no_header_means_no_directives(self):
        assert parse_cache_control(None) == parse_cache_control("")

    @pytest.mark.parametrize("value", ["-1", "\u00b2", "\u0663", "1.5", ""])
    def test_a_bad_max_age_names_the_header(self, value):
        with pytest.raises(BadRequestError, match="max-age"):
            parse_cache_control(f"max-age={value}")

    def test_a_max_age_too_large_to_hold_is_2_to_the_31(self):
        assert parse_cache_control("max-age=" + "9" * 5000).max_age == 2**31
        assert parse_cache_control("max-age=" + "0" * 30 + "7").max_age == 7


class TestSingleFlight:
    def test_followers_get_the_leaders_result_and_the_key_is_freed(self):
        async def run() -> list[Any]:
            sf = SingleFlight()
            flight, lead = sf.join("k")
            f2, lead2 = sf.join("k")
            assert lead and not lead2 and f2 is flight
            waiter = asyncio.create_task(sf.wait(f2, 5))
            await asyncio.sleep(0)
            sf.finish("k", flight, "answer")
            sf.check_valid()
            return [await waiter, len(sf), sf.join("k")[1]]

        assert asyncio.run(run()) == ["answer", 0, True]

    def test_a_failed_leader_or_a_timeout_gives_followers_nothing(self):
        async def run() -> list[Any]:
            sf = SingleFlight()
            flight, _ = sf.join("k")
            sf.join("k")
            w = asyncio.create_task(sf.wait(flight, 5))
            await asyncio.sleep(0)
            sf.finish("k", flight, error=RuntimeError("upstream"))
            other, _ = sf.join("j")
            return [await w, await sf.wait(other, 0.01)]

        assert asyncio.run(run()) == [None, None]


_text = st.text(max_size=20)


@st.composite
def chat_bodies(draw: Any) -> dict[str, Any]:
    n = draw(st.integers(1, 3))
    choices = []
    for i in range(n):
        msg: dict[str, Any] = {"role": "assistant", "content": draw(st.one_of(st.none(), _text))}
        if draw(st.booleans()):
            msg["reasoning_content"] = draw(_text)
        if draw(st.booleans()):
            msg["tool_calls"] = [{"id": f"call_{j}", "type": "function",
                                  "function": {"name": draw(_text), "arguments": draw(_text)}}
                                 for j in range(draw(st.integers(1, 2)))]
        choices.append({"index": i, "message": msg, "logprobs": None,
                        "finish_reason": draw(st.sampled_from(["stop", "length", "tool_calls"]))})
    body = {"id": "x", "object": "chat.completion", "created": 5, "model": "m",
            "choices": choices}
    if draw(st.booleans()):
        body["usage"] = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    return body


class TestStreamConversion:
    @given(chat_bodies())
    def test_a_chat_body_survives_the_round_trip_through_chunks(self, body):
        chunks = body_to_chunks(body, "chat", include_usage=True)
        assert stream_complete(chunks)
        assert chunks_to_body(chunks, "chat") == body

    @given(st.lists(_text, min_size=1, max_size=4), st.sampled_from(["stop", "length"]))
    def test_completion_chunks_assemble_to_the_concatenated_text(self, parts, finish):
        chunks = [{"id": "c", "object": "text_completion", "created": 1, "model": "m",
                   "choices": [{"index": 0, "text": p, "logprobs": None,
                                "finish_reason": None}]} for p in parts]
        chunks.append({"id": "c", "object": "text_completion", "created": 1, "model": "m",
                       "choices": [{"index": 0, "text": "", "logprobs": None,
                                    "finish_reason": finish}]})
        body = chunks_to_body(chunks, "completion")
        assert body["choices"] == [{"index": 0, "text": "".join(parts), "logprobs": None,
                                    "finish_reason": finish}]

    def test_tool_call_arguments_split_across_chunks_are_joined(self):
        head = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m"}
        chunks = [
            {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [
                {"index": 0, "id": "c1", "type": "function",
                 "function": {"name": "f", "arguments": '{"a"'}}]}, "finish_reason": None}]},
            {**head, "choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "function": {"arguments": ": 1}"}}]}, "finish_reason": None}]},
            {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        ]
        msg = chunks_to_body(chunks, "chat")["choices"][0]["message"]
        assert msg["tool_calls"] == [{"id": "c1", "type": "function",
                                      "function": {"name": "f", "arguments": '{"a": 1}'}}]

    def test_a_stream_without_a_finish_reason_is_incomplete(self):
        body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"},
                             "finish_reason": "stop"}]}
        chunks = body_to_chunks(body, "chat", include_usage=False)
        assert not stream_complete(chunks[:-1]) and not stream_complete([])


class MemoMachine(RuleBasedStateMachine):
    """The memo against a dict: whatever it returns is what was put under that exact key."""

    def __init__(self) -> None:
        super().__init__()
        self.memo: Memo[int] = Memo(max_items=5, max_bytes=64)
        self.model: dict[bytes, int] = {}

    @rule(k=st.binary(max_size=3), v=st.integers(), size=st.integers(1, 12))
    def put(self, k: bytes, v: int, size: int) -> None:
        self.memo.put(k, v, size)
        if size <= 64 // 8:
            self.model[k] = v

    @rule(k=st.binary(max_size=3))
    def get(self, k: bytes) -> None:
        got = self.memo.get(k)
        assert got is None or got == self.model.get(k)

    @invariant()
    def valid(self) -> None:
        self.memo.check_valid()


TestMemoAgainstModel = MemoMachine.TestCase
TestMemoAgainstModel.settings = settings(max_examples=50, deadline=None)


class TestSettings:
    def test_toml_is_read_and_the_environment_overrides_it(self, tmp_path, monkeypatch):
        cfg = tmp_path / "c.toml"
        cfg.write_text('[redis]\nurl = "redis://h:1/0"\ntimeout_ms = 80\n'
                       '[[tenants]]\nid = "a"\napi_keys = ["k-0123456789abcdef"]\n'
                       'canaries = ["C1"]\n')
        monkeypatch.setenv("CACHESVC_REDIS__TIMEOUT_MS", "90")
        s = load_settings(cfg)
        assert s.redis.url == "redis://h:1/0" and s.redis.timeout_ms == 90
        assert s.tenants[0].canaries == ["C1"] and s.tenants[0].scope == "tenant"
        assert s.audit.sample_rate == 0.01 and s.audit.oracle == "engine"

    def test_the_config_path_can_come_from_the_environment(self, tmp_path, monkeypatch):
        cfg = tmp_path / "c.toml"
        cfg.write_text('[admin]\napi_key = "admin-0123456789abcdef"\n')
        monkeypatch.setenv("CACHESVC_CONFIG", str(cfg))
        assert load_settings().admin.api_key == "admin-0123456789abcdef"

    def test_a_misspelt_setting_is_an_error_naming_it(self, tmp_path):
        cfg = tmp_path / "c.toml"
        cfg.write_text('[[tenants]]\nid = "a"\napi_keys = ["k-0123456789abcdef"]\n'
                       'cache_nondeterminstic = true\n')
        with pytest.raises(ConfigError, match="cache_nondeterminstic"):
            load_settings(cfg)

    @pytest.mark.parametrize("secret", ["x" * 65, "short"])
    def test_a_secret_the_service_cannot_use_is_refused_at_start_with_the_range(self, secret):
        with pytest.raises(ConfigError, match=r"cache.secret: .*16 to 64 bytes"):
            load_settings(None, cache={"secret": secret})

    def test_a_previous_secret_is_checked_the_same_and_needs_a_current_one(self):
        with pytest.raises(ConfigError, match=r"cache.previous_secrets: .*16 to 64 bytes"):
            load_settings(None, cache={"secret": "s" * 32, "previous_secrets": ["p" * 70]})
        with pytest.raises(ConfigError, match=r"needs cache.secret"):
            load_settings(None, cache={"previous_secrets": ["p" * 32]})

    def test_a_key_shared_by_two_tenants_is_refused(self):
        with pytest.raises(ConfigError, match="shared"):
            load_settings(None, tenants=[{"id": "a", "api_keys": ["k-0123456789abcdef"]},
                                         {"id": "b", "api_keys": ["k-0123456789abcdef"]}])

    def test_a_ttl_over_the_limit_is_refused(self):
        with pytest.raises(ConfigError, match="ttl_seconds"):
            load_settings(None, limits={"max_ttl_seconds": 10},
                          tenants=[{"id": "a", "api_keys": ["k-0123456789abcdef"],
                                    "ttl_seconds": 11}])

    def test_a_missing_file_is_a_clear_error(self, tmp_path):
        with pytest.raises(ConfigError, match="does not exist"):
            load_settings(tmp_path / "nope.toml")

    def test_no_tenants_gives_one_demo_tenant_whose_key_survives_a_restart(self, tmp_path):
        s, key = with_demo_tenant(load_settings(None, state_dir=str(tmp_path)))
        assert key and key.startswith("sk-demo-") and s.tenants[0].api_keys == [key]
        assert with_demo_tenant(s)[1] is None
        _again, key2 = with_demo_tenant(load_settings(None, state_dir=str(tmp_path)))
        assert key2 == key
        assert (tmp_path / "demo-key").stat().st_mode & 0o077 == 0  # owner-only
        _, other = with_demo_tenant(load_settings(None, state_dir=str(tmp_path / "elsewhere")))
        assert other != key

    def test_the_example_config_documents_every_setting(self):
        from pydantic import BaseModel

        from cachesvc.settings import Settings

        example = Path(__file__).parent.parent / "examples" / "cachesvc.toml"
        text = example.read_text()
        missing = []

        def walk(model: type[BaseModel], section: str) -> None:
            for name, field in model.model_fields.items():
                key = field.alias or name
                ann = field.annotation
                item = typing.get_args(ann)[0] if typing.get_origin(ann) is list else None
                if isinstance(ann, type) and issubclass(ann, BaseModel):
                    if f"[{key}]" not in text:
                        missing.append(f"[{key}]")
                    walk(ann, key)
                elif isinstance(item, type) and issubclass(item, BaseModel):
                    if f"[[{key}]]" not in text:
                        missing.append(f"[[{key}]]")
                    walk(item, key)
                elif not re.search(rf"^#? ?{re.escape(key)} = ", text, re.M):
                    missing.append(f"{section}.{key}")

        walk(Settings, "")
        assert not missing, f"examples/cachesvc.toml does not document {missing}"

    def test_the_example_config_is_valid(self):
        example = os.path.join(os.path.dirname(__file__), "..", "examples", "cachesvc.toml")
        s = load_settings(example)
        assert s.tenants and s.admin.api_key


class TestTenants:
    def directory(self) -> TenantDirectory:
        return TenantDirectory(load_settings(
            None, admin={"api_key": "admin-0123456789abcdef"},
            tenants=[{"id": "a", "api_keys": ["key-a-0123456789ab"]},
                     {"id": "u", "api_keys": ["key-u-0123456789ab"], "scope": "user"}]))

    def test_the_key_decides_the_tenant(self):
        assert self.directory().authenticate("Bearer key-a-0123456789ab").id == "a"
        assert self.directory().authenticate("bearer key-u-0123456789ab").id == "u"

    @pytest.mark.parametrize("header", [None, "", "Bearer ", "Basic key-a-0123456789ab",
                                        "Bearer key-a-0123456789ac",
                                        "Bearer admin-0123456789abcdef"])
    def test_anything_else_is_refused(self, header):
        with pytest.raises(AuthError):
            self.directory().authenticate(header)

    def test_only_the_admin_key_is_admin(self):
        d = self.directory()
        d.authenticate_admin("Bearer admin-0123456789abcdef")
        with pytest.raises(AuthError, match="admin"):
            d.authenticate_admin("Bearer key-a-0123456789ab")

    def test_a_user_scope_comes_from_the_body_inside_the_tenant(self):
        u = self.directory().authenticate("Bearer key-u-0123456789ab")
        assert u.scope_for({"user": "alice"}).label == "user:u/alice"
        with pytest.raises(BadRequestError, match="user"):
            u.scope_for({})

