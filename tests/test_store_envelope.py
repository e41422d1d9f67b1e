"""The entry envelope: round-trips every entry, and refuses damaged or foreign bytes with a
specific error instead of returning them."""

from __future__ import annotations

import random
import zlib
from dataclasses import replace

import msgpack
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from cachesvc.store import (
    CorruptEntryError,
    EntryDecodeError,
    EntryKeys,
    ForeignEntryError,
    ForgedEntryError,
    InvalidEntryError,
    OversizeEntryError,
    StoreConfigError,
    UnknownKeyError,
    UnsupportedVersionError,
    decode_entry,
    encode_entry,
)
from cachesvc.store.envelope import HEADER_SIZE, MAGIC
from keying import Scope
from tests.store_helpers import KEYS, make_entry, payload_of, signed

json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text()
json_values = st.recursive(
    json_scalars | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
scopes = st.one_of(
    st.just(Scope.public()),
    st.builds(Scope.for_tenant, st.text(min_size=1)),
    st.builds(Scope.for_user, st.text(min_size=1), st.text(min_size=1)),
)


#: Any extra fields an upstream may add, around the parts the response shape fixes.
extras = st.dictionaries(st.text().filter(lambda k: k not in (
    "choices", "usage", "index", "finish_reason", "message", "delta", "text")), json_values,
    max_size=3)
responses = st.builds(
    lambda top, choice, text: {**top, "choices": [
        {**choice, "index": 0, "finish_reason": "stop",
         "message": {"role": "assistant", "content": text}}]},
    extras, extras, st.text())
streams = st.builds(
    lambda heads, texts: [{**h, "choices": [{"index": 0, "delta": {"content": t},
                                              "finish_reason": None}]}
                          for h, t in zip(heads, texts, strict=False)]
    + [{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}],
    st.lists(extras, max_size=4), st.lists(st.text(), max_size=4))



class TestEnvelopeRoundTrip:
    @given(
        scope=scopes,
        response=responses,
        epoch=st.integers(0, 2**53),
        ttl=st.none() | st.floats(0.001, 1e9),
    )
    def test_any_response_entry_round_trips(self, scope, response, epoch, ttl) -> None:  # type: ignore[no-untyped-def]
        entry = make_entry(scope=scope, response=response, epoch=epoch, ttl=ttl)
        assert decode_entry(encode_entry(entry, keys=KEYS), keys=KEYS) == entry

    @given(stream=streams)
    def test_any_recorded_stream_round_trips(self, stream) -> None:  # type: ignore[no-untyped-def]
        entry = make_entry(stream=stream, response=None)
        assert decode_entry(encode_entry(entry, keys=KEYS), keys=KEYS) == entry

    @given(material=st.binary(min_size=1, max_size=2000))
    def test_the_key_material_round_trips(self, material: bytes) -> None:
        entry = replace(make_entry(), material=material)
        assert decode_entry(encode_entry(entry, keys=KEYS), keys=KEYS).material == material

    def test_an_entry_without_material_encodes_as_before_and_reads_as_none(self) -> None:
        """The field is optional: an entry without material has no trace of it in its bytes."""
        entry = make_entry()
        raw = encode_entry(entry, keys=KEYS)
        payload = msgpack.unpackb(raw[HEADER_SIZE:], raw=False)
        assert "k" not in payload
        assert decode_entry(raw, keys=KEYS).material is None
        with_material = encode_entry(replace(entry, material=b"\x97material"), keys=KEYS)
        assert msgpack.unpackb(with_material[HEADER_SIZE:], raw=False)["k"] == b"\x97material"

    def test_long_material_is_stored_compressed_and_read_back_whole(self) -> None:
        material = b"\x97" + b"You are a support agent. Where is my parcel? " * 200
        entry = replace(make_entry(), material=material)
        raw = encode_entry(entry, keys=KEYS)
        payload = msgpack.unpackb(raw[HEADER_SIZE:], raw=False)
        assert "k" not in payload and len(payload["kz"]) < len(material) // 5
        assert decode_entry(raw, keys=KEYS) == entry
        # The hit path leaves it packed: everything else is the same entry.
        assert decode_entry(raw, material=False, keys=KEYS) == replace(entry, material=None)

    def test_material_that_does_not_compress_is_stored_as_is(self) -> None:
        material = random.Random(1).randbytes(2048)
        payload = msgpack.unpackb(encode_entry(replace(make_entry(), material=material),
                                               keys=KEYS)[HEADER_SIZE:],
                                  raw=False)
        assert payload["k"] == material and "kz" not in payload
        assert decode_entry(encode_entry(replace(make_entry(), material=material), keys=KEYS),
                            material=False, keys=KEYS).material is None

    @pytest.mark.parametrize("packed", [b"not zlib", zlib.compress(b"x" * 100)[:-3], 7])
    def test_compressed_material_that_does_not_inflate_is_corrupt(self, packed: object) -> None:
        """Behind a valid MAC (a writer's bug, not damage): refused, never half-read."""
        good = msgpack.unpackb(encode_entry(make_entry(), keys=KEYS)[HEADER_SIZE:], raw=False)
        payload = msgpack.packb({**good, "kz": packed}, use_bin_type=True)
        with pytest.raises(CorruptEntryError):
            decode_entry(signed(payload), keys=KEYS)


class TestEnvelopeRefusesBadBytes:
    def test_every_single_bit_flip_is_refused(self) -> None:
        raw = encode_entry(make_entry(), keys=KEYS)
        for i in range(len(raw)):
            for bit in (0, 7):
                damaged = bytearray(raw)
                damaged[i] ^= 1 << bit
                with pytest.raises(EntryDecodeError):
                    decode_entry(bytes(damaged), keys=KEYS)

    @pytest.mark.parametrize("cut", [1, 3, 5, HEADER_SIZE, HEADER_SIZE + 1, -1])
    def test_a_truncated_envelope_is_refused(self, cut: int) -> None:
        raw = encode_entry(make_entry(), keys=KEYS)
        with pytest.raises((CorruptEntryError, ForgedEntryError), match=r"truncated|MAC"):
            decode_entry(raw[:cut], keys=KEYS)

    @pytest.mark.parametrize("raw", [b"", b"hello", b'{"choices": []}', b"\x00" * 40])
    def test_foreign_bytes_are_foreign(self, raw: bytes) -> None:
        with pytest.raises(ForeignEntryError, match="magic"):
            decode_entry(raw, keys=KEYS)

    def test_another_format_version_is_unsupported(self) -> None:
        raw = bytearray(encode_entry(make_entry(), keys=KEYS))
        raw[4] = 3
        with pytest.raises(UnsupportedVersionError, match="version 3"):
            decode_entry(bytes(raw), keys=KEYS)

    def test_a_version_1_entry_with_its_unkeyed_checksum_is_never_served(self) -> None:
        """Version 1 had an xxh3 checksum anyone can recompute: such bytes are refused."""
        payload = msgpack.unpackb(encode_entry(make_entry(), keys=KEYS)[HEADER_SIZE:], raw=False)
        body = msgpack.packb(payload, use_bin_type=True)
        h = xxhash.xxh3_64(MAGIC)
        h.update(b"\x01")
        h.update(body)
        with pytest.raises(UnsupportedVersionError, match="version 1"):
            decode_entry(MAGIC + b"\x01" + h.intdigest().to_bytes(8, "big") + body, keys=KEYS)

    def test_a_valid_mac_over_the_wrong_schema_is_corrupt(self) -> None:
        payload = msgpack.packb({"s": ["tenant", "a", None], "m": "m"})
        with pytest.raises(CorruptEntryError, match="schema"):
            decode_entry(signed(payload), keys=KEYS)


class TestEntryValidation:
    def test_an_entry_needs_exactly_one_of_response_and_stream(self) -> None:
        with pytest.raises(InvalidEntryError, match="exactly one"):
            make_entry(response={"a": 1}, stream=[{}])

    @pytest.mark.parametrize(
        ("changes", "field"),
        [({"epoch": -1}, "epoch"), ({"ttl": 0}, "ttl"), ({"model": ""}, "model"),
         ({"version": ""}, "model_version")],
    )
    def test_bad_fields_are_named(self, changes: dict, field: str) -> None:  # type: ignore[type-arg]
        with pytest.raises(InvalidEntryError, match=f"^{field}:"):
            make_entry(**changes)

    @pytest.mark.parametrize("material", [b"", "text", bytearray(b"x")])
    def test_material_must_be_non_empty_bytes(self, material: object) -> None:
        with pytest.raises(InvalidEntryError, match=r"^material:"):
            replace(make_entry(), material=material)


class TestEntryMismatch:
    def test_a_matching_request_may_be_served(self) -> None:
        e = make_entry()
        assert e.mismatch(scope=e.scope, model=e.model, epoch=e.epoch, digest=e.digest,
                          material_digest=e.material_digest) is None

    @pytest.mark.parametrize(
        ("change", "reason"),
        [({"scope": Scope.for_tenant("other")}, "cross_scope"), ({"epoch": 2}, "stale"),
         ({"model": "m2"}, "stale"), ({"material_digest": b"\x00" * 32}, "collision")],
    )
    def test_a_mismatch_names_the_finding(self, change: dict, reason: str) -> None:  # type: ignore[type-arg]
        e = make_entry()
        expected = {"scope": e.scope, "model": e.model, "epoch": e.epoch, "digest": e.digest,
                    "material_digest": e.material_digest} | change
        assert e.mismatch(**expected) == reason



class TestEntryMac:
    """Write access to the store without the secret cannot make an entry verify."""

    def test_a_rewritten_answer_with_the_old_mac_is_forged(self) -> None:
        raw = encode_entry(make_entry(), keys=KEYS)
        payload = payload_of(raw)
        payload["r"]["choices"][0]["message"]["content"] = "a planted answer"
        with pytest.raises(ForgedEntryError):
            decode_entry(raw[:HEADER_SIZE] + msgpack.packb(payload, use_bin_type=True),
                         keys=KEYS)

    def test_one_entrys_metadata_over_anothers_answer_is_forged(self) -> None:
        x = payload_of(encode_entry(make_entry(name="x"), keys=KEYS))
        y_raw = encode_entry(make_entry(name="y"), keys=KEYS)
        swapped = {**x, "r": payload_of(y_raw)["r"]}
        for header in (y_raw[:HEADER_SIZE], encode_entry(make_entry(name="x"),
                                                         keys=KEYS)[:HEADER_SIZE]):
            with pytest.raises(ForgedEntryError):
                decode_entry(header + msgpack.packb(swapped, use_bin_type=True), keys=KEYS)

    def test_an_entry_signed_under_another_secret_has_an_unknown_key(self) -> None:
        other = EntryKeys(b"someone-else-0123456789")
        with pytest.raises(UnknownKeyError, match="previous_secrets"):
            decode_entry(encode_entry(make_entry(), keys=other), keys=KEYS)

    def test_during_a_rotation_entries_under_the_previous_secret_still_verify(self) -> None:
        old = EntryKeys(b"old-secret-0123456789abc")
        raw = encode_entry(make_entry(), keys=old)
        rotated = EntryKeys(b"new-secret-0123456789abc", [b"old-secret-0123456789abc"])
        entry = decode_entry(raw, keys=rotated)
        assert entry == make_entry() and entry.key_id == old.current_id != rotated.current_id
        assert rotated.secret_for(entry.key_id) == b"old-secret-0123456789abc"
        # New entries are signed under the new secret only.
        assert decode_entry(encode_entry(make_entry(), keys=rotated),
                            keys=EntryKeys(b"new-secret-0123456789abc")) == make_entry()
        # Once the old secret is dropped, its entries are refused.
        with pytest.raises(UnknownKeyError):
            decode_entry(raw, keys=EntryKeys(b"new-secret-0123456789abc"))

    @pytest.mark.parametrize("secret", [b"short", b"x" * 65])
    def test_a_secret_blake2b_cannot_key_is_refused_with_the_range(self, secret: bytes) -> None:
        with pytest.raises(StoreConfigError, match="16 to 64 bytes"):
            EntryKeys(secret)


#: Answers the fill path refuses; the read path must refuse the same bytes behind a valid MAC.
BAD_ANSWERS = {
    "empty choices": ({"choices": []}, None, "response.choices"),
    "no finish_reason": ({"choices": [{"index": 0, "message": {"content": "x"}}]}, None,
                         "finish_reason"),
    "choice not an object": ({"choices": ["x"]}, None, r"choices\[0\]"),
    "index not an integer": ({"choices": [{"index": [1], "finish_reason": "stop",
                                           "message": {}}]}, None, "index"),
    "message a string": ({"choices": [{"index": 0, "finish_reason": "stop",
                                       "message": "hi"}]}, None, "message"),
    "stream never finishes": (None, [{"choices": [{"index": 0, "delta": {"content": "x"}}]}],
                              "finish_reason"),
    "stream of no choices": (None, [{"choices": []}], "no choice"),
    "delta a string": (None, [{"choices": [{"index": 0, "delta": "x",
                                            "finish_reason": "stop"}]}], "delta"),
    "mixed index types": (None, [
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"choices": [{"index": "1", "delta": {}, "finish_reason": "stop"}]}], "index"),
}


class TestAnswerShapeIsCheckedOnWriteAndRead:
    @pytest.mark.parametrize("case", sorted(BAD_ANSWERS))
    def test_the_fill_path_refuses_it_naming_the_field(self, case: str) -> None:
        response, stream, field = BAD_ANSWERS[case]
        with pytest.raises(InvalidEntryError, match=field):
            make_entry(response=response, stream=stream)

    @pytest.mark.parametrize("case", sorted(BAD_ANSWERS))
    def test_the_same_answer_behind_a_valid_mac_is_refused_on_read(self, case: str) -> None:
        response, stream, field = BAD_ANSWERS[case]
        payload = payload_of(encode_entry(make_entry(), keys=KEYS))
        payload.update(r=response, st=stream)
        with pytest.raises(CorruptEntryError, match=field):
            decode_entry(signed(msgpack.packb(payload, use_bin_type=True)), keys=KEYS)


class TestReadLimits:
    def test_bytes_over_max_entry_bytes_are_refused_before_they_are_verified(self) -> None:
        raw = encode_entry(make_entry(), keys=KEYS)
        with pytest.raises(OversizeEntryError, match="max_entry_bytes"):
            decode_entry(raw, keys=KEYS, max_bytes=len(raw) - 1)
        # Oversize is decided on the length alone: foreign bytes that long are not parsed.
        with pytest.raises(OversizeEntryError):
            decode_entry(b"\0" * 100, keys=KEYS, max_bytes=99)

    @pytest.mark.parametrize(("changes", "problem"), [
        ({"ttl": None}, "never expires"),
        ({"ttl": 31 * 86_400.0}, "exceeds limits.max_ttl_seconds"),
        ({"created_at": 1_700_000_000.0 + 3600}, "in the future"),
    ])
    def test_a_lifetime_the_fill_path_never_writes_is_named(self, changes: dict,  # type: ignore[type-arg]
                                                            problem: str) -> None:
        entry = make_entry(**changes)
        assert problem in (entry.lifetime_problem(1_700_000_000.0, max_ttl_s=30 * 86_400.0)
                           or "")
        assert make_entry().lifetime_problem(1_700_000_000.0, max_ttl_s=30 * 86_400.0) is None


#: Values where the shape check does not look: anything JSON.
_wild = st.none() | st.booleans() | st.integers(-2, 3) | st.text(max_size=3) | st.lists(
    st.integers(0, 2), max_size=2) | st.dictionaries(st.sampled_from(["a", "index"]),
                                                     st.integers(0, 2), max_size=2)
_calls = st.lists(st.fixed_dictionaries({}, optional={
    "index": st.integers(0, 2), "id": _wild, "type": _wild,
    "function": st.fixed_dictionaries({}, optional={"name": _wild, "arguments": _wild}),
}), max_size=3)
_message = st.fixed_dictionaries({}, optional={
    "role": st.text(max_size=3), "content": st.none() | st.text(max_size=3)
    | st.lists(st.dictionaries(st.text(max_size=2), _wild, max_size=2), max_size=2),
    "tool_calls": _calls, "refusal": _wild, "reasoning_content": _wild})
_choice = st.fixed_dictionaries(
    {"index": st.integers(0, 2)},
    optional={"finish_reason": st.sampled_from(["stop", "length"]), "logprobs": _wild,
              "extra": _wild}).flatmap(lambda c: st.sampled_from([
                  st.fixed_dictionaries({**{k: st.just(v) for k, v in c.items()},
                                         "message": _message}),
                  st.fixed_dictionaries({**{k: st.just(v) for k, v in c.items()},
                                         "delta": _message}),
                  st.fixed_dictionaries({**{k: st.just(v) for k, v in c.items()},
                                         "text": st.text(max_size=3)})])).flatmap(lambda x: x)
_answers = st.fixed_dictionaries({"choices": st.lists(_choice, min_size=1, max_size=3)},
                                 optional={"usage": st.none() | st.dictionaries(
                                     st.text(max_size=2), _wild, max_size=2), "id": _wild})


class TestEveryAcceptedAnswerCanBeServed:
    """What passes the shape check converts both ways without raising: a stored entry is
    served (as a body or a stream, chat or completion), never a 500."""

    @settings(max_examples=300)  # about one in six generated answers passes the check
    @given(answer=_answers)
    def test_a_body(self, answer) -> None:  # type: ignore[no-untyped-def]
        from cachesvc.response_cache import Payload
        from cachesvc.store.answer import answer_problem

        if answer_problem(response=answer) is None:
            for kind in ("chat", "completion"):
                Payload(stream=False, body=answer).as_chunks(kind, include_usage=True)

    @settings(max_examples=300)
    @given(chunks=st.lists(_answers, min_size=1, max_size=3))
    def test_a_stream(self, chunks) -> None:  # type: ignore[no-untyped-def]
        from cachesvc.response_cache import Payload
        from cachesvc.store.answer import answer_problem

        if answer_problem(stream=chunks) is None:
            for kind in ("chat", "completion"):
                Payload(stream=True, chunks=chunks).as_body(kind)
