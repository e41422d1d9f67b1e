"""Property tests of the key builder: determinism, sensitivity, framing, separation, collisions."""

from __future__ import annotations

import itertools
from typing import Any

import msgpack
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from keying import (
    InvalidMaterialError,
    KeyParams,
    Scope,
    build_key,
    canonicalize,
    decode_material,
    encode_material,
    rebuild_key,
)
from keying.strategies import chat_requests, completion_requests, mutated, requests, respelled

ACME = Scope.for_tenant("acme")
_ids = st.text(min_size=1, max_size=12)


def digest(body: dict[str, Any], scope: Scope = ACME, epoch: int = 0, **kw: Any) -> bytes:
    return build_key(body, KeyParams(scope=scope, epoch=epoch, **kw)).digest


class TestDeterminism:
    @given(requests().flatmap(lambda r: st.tuples(st.just(r), respelled(r))))
    @settings(max_examples=400)
    def test_every_equivalent_spelling_keys_the_same(self, pair: tuple[dict, dict]) -> None:
        original, respelling = pair
        assert canonicalize(original).fields == canonicalize(respelling).fields
        assert digest(original) == digest(respelling)

    @given(requests())
    def test_same_request_same_key(self, request: dict) -> None:
        a = build_key(request, KeyParams(scope=ACME))
        b = build_key(request, KeyParams(scope=ACME))
        assert (a.digest, a.material_digest, a.material) == (b.digest, b.material_digest,
                                                             b.material)


class TestSensitivity:
    @given(requests().flatmap(lambda r: st.tuples(st.just(r), mutated(r))))
    @settings(max_examples=400)
    def test_any_keyed_field_change_changes_the_key(self, pair: tuple[dict, Any]) -> None:
        original, (field, changed) = pair
        assert digest(original) != digest(changed), field

    @given(chat_requests(), st.sampled_from(["x_a", "x_b", "top_k", "min_p"]),
           st.integers(-(2**63), 2**63))
    def test_unknown_fields_change_the_key(self, request: dict, name: str, value: int) -> None:
        assume(name not in request)
        assert digest(request) != digest({**request, name: value})


class TestFraming:
    _component = st.one_of(st.none(), st.text(max_size=8), st.integers(0, 2**40))

    @given(
        st.tuples(_ids, st.one_of(st.none(), _ids), st.text(max_size=8), st.integers(0, 99),
                  st.one_of(st.none(), st.text(max_size=8))),
        st.tuples(_ids, st.one_of(st.none(), _ids), st.text(max_size=8), st.integers(0, 99),
                  st.one_of(st.none(), st.text(max_size=8))),
    )
    def test_distinct_component_tuples_never_share_material(self, a: tuple, b: tuple) -> None:
        assume(a != b)
        req = canonicalize({"model": "m", "prompt": "p"})

        def enc(t: tuple) -> bytes:
            tenant, user, model, epoch, adapter = t
            scope = Scope.for_user(tenant, user) if user else Scope.for_tenant(tenant)
            return encode_material(scope=scope, model=model or "m", epoch=epoch,
                                   adapter=adapter, request=req)

        assume((a[1] or None, a[2] or "m") != (b[1] or None, b[2] or "m") or a[0] != b[0]
               or a[3:] != b[3:])
        assert enc(a) != enc(b)

    @given(requests(), _ids, st.integers(0, 2**32))
    def test_material_decodes_back_to_its_components(self, request: dict, tenant: str,
                                                     epoch: int) -> None:
        """Decoding recovers every component, so the encoding is injective."""
        r = build_key(request, KeyParams(scope=Scope.for_tenant(tenant), epoch=epoch))
        _version, scope, model, ep, _adapter, _kind, fields = msgpack.unpackb(r.material, raw=False)
        assert scope == ["scope", ["tenant", tenant, None]]
        assert model == ["model", request["model"]]
        assert ep == ["epoch", epoch]
        assert fields == ["request", r.canonical.keyed]


class TestReadBack:
    """The auditor reads the request back out of stored material and keys it again."""

    @given(requests(), _ids, st.one_of(st.none(), _ids), st.integers(0, 2**40),
           st.one_of(st.none(), _ids))
    @settings(max_examples=300)
    def test_material_rebuilds_to_the_same_key(self, request: dict, tenant: str,
                                               user: str | None, epoch: int,
                                               adapter: str | None) -> None:
        scope = Scope.for_user(tenant, user) if user else Scope.for_tenant(tenant)
        k = build_key(request, KeyParams(scope=scope, epoch=epoch, adapter=adapter))
        parts = decode_material(k.material)
        assert (parts.scope, parts.model, parts.epoch, parts.adapter, parts.kind) == (
            scope, request["model"], epoch, adapter, k.canonical.kind)
        assert parts.fields == k.canonical.fields
        again = rebuild_key(k.material)
        assert (again.digest, again.material_digest, again.material) == (
            k.digest, k.material_digest, k.material)
        assert again.cacheability == k.cacheability
        minimal = build_key(again.canonical.body(minimal=True), KeyParams(
            scope=scope, epoch=epoch, adapter=adapter, kind=parts.kind))
        assert minimal.material == k.material
        assert len(again.canonical.body(minimal=True)) <= len(parts.body())

    def test_the_minimal_body_leaves_out_defaults(self) -> None:
        k = build_key({"model": "m", "temperature": 0,
                       "messages": [{"role": "user", "content": "hi"}]},
                      KeyParams(scope=ACME))
        body = rebuild_key(k.material).canonical.body(minimal=True)
        assert body == {"model": "m", "temperature": 0.0,
                        "messages": [{"role": "user", "content": "hi"}]}

    @given(requests(), st.data())
    @settings(max_examples=200)
    def test_altered_material_never_rebuilds_to_itself(self, request: dict,
                                                       data: st.DataObject) -> None:
        """Any one changed byte is refused with InvalidMaterialError (never another exception,
        which would stop a scan) or reads back as a request that keys to exactly those bytes."""
        material = build_key(request, KeyParams(scope=ACME)).material
        i = data.draw(st.integers(0, len(material) - 1))
        flip = data.draw(st.integers(1, 255))
        altered = material[:i] + bytes([material[i] ^ flip]) + material[i + 1:]
        try:
            again = rebuild_key(altered)
        except InvalidMaterialError:
            return
        assert again.material == altered != material

    def test_what_is_not_material_is_refused_by_name(self) -> None:
        for junk in (b"", b"\xc1", msgpack.packb([1, 2, 3]), msgpack.packb(["llmcache-key/v0"])):
            with pytest.raises(InvalidMaterialError):
                decode_material(junk)


class TestSeparation:
    @given(requests(), _ids, _ids)
    def test_scopes_separate(self, request: dict, t1: str, t2: str) -> None:
        assume(t1 != t2)
        assert digest(request, Scope.for_tenant(t1)) != digest(request, Scope.for_tenant(t2))
        assert digest(request, Scope.for_tenant(t1)) != digest(request, Scope.for_user(t1, t2))
        assert digest(request, Scope.for_tenant(t1)) != digest(request, Scope.public())

    @given(requests(), st.integers(0, 2**40), st.integers(0, 2**40))
    def test_epochs_separate(self, request: dict, e1: int, e2: int) -> None:
        assume(e1 != e2)
        assert digest(request, epoch=e1) != digest(request, epoch=e2)

    @given(requests(), _ids)
    def test_models_separate(self, request: dict, other: str) -> None:
        assume(other != request["model"])
        assert digest(request) != digest({**request, "model": other})

    @given(completion_requests(), _ids)
    def test_adapters_separate(self, request: dict, adapter: str) -> None:
        assert digest(request) != digest(request, adapter=adapter)


@pytest.mark.slow
class TestCollisions:
    def test_no_collision_across_300k_near_identical_requests(self) -> None:
        """Requests one character, one number, one tenant or one epoch apart never collide."""
        seen: dict[bytes, tuple] = {}
        base = "Summarise the following ticket for the on-call engineer: "
        variants = itertools.product(
            range(2500),  # ticket number in the text
            (0, 0.1, 1),  # temperature (seeded, so all cacheable)
            ("acme", "acme1"),  # tenants one character apart
            (0, 1),  # epochs
            (None, 7),  # max_tokens
        )
        count = 0
        material: dict[bytes, bytes] = {}
        for n, temp, tenant, epoch, max_tokens in variants:
            body = {
                "model": "m",
                "seed": 1,
                "temperature": temp,
                "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": f"{base}{n}"}],
            }
            r = build_key(body, KeyParams(scope=Scope.for_tenant(tenant), epoch=epoch))
            ident = (n, temp, tenant, epoch, max_tokens)
            assert r.digest not in seen, (ident, seen.get(r.digest))
            assert r.material_digest not in material
            seen[r.digest] = ident
            material[r.material_digest] = r.digest
            count += 1
        assert count == 60_000
        # And single-character edits anywhere in a long prompt.
        long = "x" * 400
        for i in range(400):
            for ch in "abcd":
                text = long[:i] + ch + long[i + 1:]
                d = digest({"model": "m", "prompt": text, "temperature": 0})
                assert d not in seen
                seen[d] = (i, ch)
        for n in range(150_000):
            d = digest({"model": "m", "prompt": str(n), "temperature": 0})
            assert d not in seen
            seen[d] = (n,)
        assert len(seen) == 60_000 + 1_600 + 150_000
