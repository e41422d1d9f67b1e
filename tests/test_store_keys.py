"""Storage keys: scope and epoch are structural, every component is escaped, and a purge
pattern built for one tenant or model never matches another's keys."""

from __future__ import annotations

import fnmatch

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachesvc.store import parse_storage_key, storage_key
from cachesvc.store.base import key_matches, selector_pattern
from invalidation import PurgeSelector
from keying import Scope

ids = st.text(min_size=1, max_size=120) | st.sampled_from(
    ["*", ":", "{", "}", "{a}", "a:b", "[", "]", "?", "\\", "/", "t/x", "%3A", "~ab", "日本",
     "x" * 400]
)
scopes = st.one_of(
    st.just(Scope.public()),
    st.builds(Scope.for_tenant, ids),
    st.builds(Scope.for_user, ids, ids),
)
DIGEST = bytes(range(16))


def redis_glob(pattern: str, key: str) -> bool:
    # Our patterns use only `*` and `[..]`, where Redis' glob and fnmatchcase agree.
    return fnmatch.fnmatchcase(key, pattern)


class TestStorageKeyLayout:
    @given(scope=scopes, model=ids, epoch=st.integers(0, 2**53))
    def test_a_key_has_a_fixed_structure_whatever_the_components(self, scope, model, epoch) -> None:  # type: ignore[no-untyped-def]
        key = storage_key(scope=scope, model=model, epoch=epoch, digest=DIGEST)
        assert key.count(":") == 5
        assert not set(key) & set("{}*?[]\\ ")
        assert key.isascii()
        parts = parse_storage_key(key)
        assert parts is not None and parts.epoch == epoch and parts.digest == DIGEST

    @given(a=scopes, b=scopes, ma=ids, mb=ids, ea=st.integers(0, 9), eb=st.integers(0, 9))
    def test_distinct_scope_model_or_epoch_give_distinct_keys(self, a, b, ma, mb, ea, eb) -> None:  # type: ignore[no-untyped-def]
        ka = storage_key(scope=a, model=ma, epoch=ea, digest=DIGEST)
        kb = storage_key(scope=b, model=mb, epoch=eb, digest=DIGEST)
        assert (ka == kb) == ((a, ma, ea) == (b, mb, eb))

    @given(victim=ids, other=scopes, model=ids)
    def test_a_tenant_purge_pattern_matches_only_that_tenants_keys(
        self, victim, other, model) -> None:  # type: ignore[no-untyped-def]
        selector = PurgeSelector(tenant=victim)
        key = storage_key(scope=other, model=model, epoch=1, digest=DIGEST)
        parts = parse_storage_key(key)
        assert parts is not None
        belongs = other.tenant == victim
        if belongs:
            assert redis_glob(selector_pattern(selector), key)
        assert key_matches(parts, selector) == belongs

    @given(model=ids, other=ids, epoch=st.integers(0, 20), cutoff=st.integers(0, 20))
    def test_a_model_purge_matches_only_that_models_older_epochs(
        self, model, other, epoch, cutoff) -> None:  # type: ignore[no-untyped-def]
        selector = PurgeSelector(model=model, before_epoch=cutoff)
        key = storage_key(scope=Scope.for_tenant("t"), model=other, epoch=epoch, digest=DIGEST)
        parts = parse_storage_key(key)
        assert parts is not None
        wanted = other == model and epoch < cutoff
        if wanted:
            assert redis_glob(selector_pattern(selector), key)
        assert key_matches(parts, selector) == wanted

    @pytest.mark.parametrize(
        "key",
        ["llmc:v1:t/a:m:e1:zz", "llmc:v1:t/a:m:e01:" + "0" * 32, "llmc:v1:x/a:m:e1:" + "0" * 32,
         "other:v1:t/a:m:e1:" + "0" * 32, "llmc:v1:t/a:b:m:e1:" + "0" * 32, b"\xff\xfe"],
    )
    def test_a_key_not_of_our_layout_does_not_parse(self, key: str | bytes) -> None:
        assert parse_storage_key(key) is None
