"""The entry envelope: round-trips every entry, and refuses damaged or foreign bytes with a
specific error instead of returning them."""

from __future__ import annotations

import random
import zlib
from dataclasses import replace

import msgpack
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from cachesvc.store import (
    CorruptEntryError,
    EntryDecodeError,
    ForeignEntryError,
    InvalidEntryError,
    UnsupportedVersionError,
    decode_entry,
    encode_entry,
)
from cachesvc.store.envelope import HEADER_SIZE, MAGIC
from keying import Scope
from tests.store_helpers import make_entry

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


class TestEnvelopeRoundTrip:
    @given(
        scope=scopes,
        response=st.dictionaries(st.text(), json_values, max_size=5),
        epoch=st.integers(0, 2**53),
        ttl=st.none() | st.floats(0.001, 1e9),
    )
    def test_any_response_entry_round_trips(self, scope, response, epoch, ttl) -> None:  # type: ignore[no-untyped-def]
        entry = make_entry(scope=scope, response=response, epoch=epoch, ttl=ttl)
        assert decode_entry(encode_entry(entry)) == entry

    @given(stream=st.lists(st.dictionaries(st.text(), json_values, max_size=3), max_size=5))
    def test_any_recorded_stream_round_trips(self, stream) -> None:  # type: ignore[no-untyped-def]
        entry = make_entry(stream=stream, response=None)
        assert decode_entry(encode_entry(entry)) == entry

    @given(material=st.binary(min_size=1, max_size=2000))
    def test_the_key_material_round_trips(self, material: bytes) -> None:
        entry = replace(make_entry(), material=material)
        assert decode_entry(encode_entry(entry)).material == material

    def test_an_entry_without_material_encodes_as_before_and_reads_as_none(self) -> None:
        """The field is optional within format version 1: old entries still decode, and an
        entry without material has no trace of it in its bytes."""
        entry = make_entry()
        raw = encode_entry(entry)
        payload = msgpack.unpackb(raw[HEADER_SIZE:], raw=False)
        assert "k" not in payload
        assert decode_entry(raw).material is None
        with_material = encode_entry(replace(entry, material=b"\x97material"))
        assert msgpack.unpackb(with_material[HEADER_SIZE:], raw=False)["k"] == b"\x97material"

    def test_long_material_is_stored_compressed_and_read_back_whole(self) -> None:
        material = b"\x97" + b"You are a support agent. Where is my parcel? " * 200
        entry = replace(make_entry(), material=material)
        raw = encode_entry(entry)
        payload = msgpack.unpackb(raw[HEADER_SIZE:], raw=False)
        assert "k" not in payload and len(payload["kz"]) < len(material) // 5
        assert decode_entry(raw) == entry
        # The hit path leaves it packed: everything else is the same entry.
        assert decode_entry(raw, material=False) == replace(entry, material=None)

    def test_material_that_does_not_compress_is_stored_as_is(self) -> None:
        material = random.Random(1).randbytes(2048)
        payload = msgpack.unpackb(encode_entry(replace(make_entry(), material=material))[HEADER_SIZE:],
                                  raw=False)
        assert payload["k"] == material and "kz" not in payload
        assert decode_entry(encode_entry(replace(make_entry(), material=material)),
                            material=False).material is None

    @pytest.mark.parametrize("packed", [b"not zlib", zlib.compress(b"x" * 100)[:-3], 7])
    def test_compressed_material_that_does_not_inflate_is_corrupt(self, packed: object) -> None:
        """Behind a valid checksum (a writer's bug, not damage): refused, never half-read."""
        good = msgpack.unpackb(encode_entry(make_entry())[HEADER_SIZE:], raw=False)
        payload = msgpack.packb({**good, "kz": packed}, use_bin_type=True)
        h = xxhash.xxh3_64(MAGIC)
        h.update(b"\x01")
        h.update(payload)
        raw = MAGIC + b"\x01" + h.intdigest().to_bytes(8, "big") + payload
        with pytest.raises(CorruptEntryError):
            decode_entry(raw)


class TestEnvelopeRefusesBadBytes:
    def test_every_single_bit_flip_is_refused(self) -> None:
        raw = encode_entry(make_entry())
        for i in range(len(raw)):
            for bit in (0, 7):
                damaged = bytearray(raw)
                damaged[i] ^= 1 << bit
                with pytest.raises(EntryDecodeError):
                    decode_entry(bytes(damaged))

    @pytest.mark.parametrize("cut", [1, 3, 5, HEADER_SIZE, HEADER_SIZE + 1, -1])
    def test_a_truncated_envelope_is_corrupt(self, cut: int) -> None:
        raw = encode_entry(make_entry())
        with pytest.raises(CorruptEntryError, match="truncated|checksum"):
            decode_entry(raw[:cut])

    @pytest.mark.parametrize("raw", [b"", b"hello", b'{"choices": []}', b"\x00" * 40])
    def test_foreign_bytes_are_foreign(self, raw: bytes) -> None:
        with pytest.raises(ForeignEntryError, match="magic"):
            decode_entry(raw)

    def test_another_format_version_is_unsupported(self) -> None:
        raw = bytearray(encode_entry(make_entry()))
        raw[4] = 2
        with pytest.raises(UnsupportedVersionError, match="version 2"):
            decode_entry(bytes(raw))

    def test_a_valid_checksum_over_the_wrong_schema_is_corrupt(self) -> None:
        payload = msgpack.packb({"s": ["tenant", "a", None], "m": "m"})
        h = xxhash.xxh3_64(MAGIC)
        h.update(b"\x01")
        h.update(payload)
        raw = MAGIC + b"\x01" + h.intdigest().to_bytes(8, "big") + payload
        with pytest.raises(CorruptEntryError, match="schema"):
            decode_entry(raw)


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
        with pytest.raises(InvalidEntryError, match="^material:"):
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
