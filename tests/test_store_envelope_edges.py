"""Edges of the entry envelope and the entry MAC that the main suite does not reach: each field
check of ``Entry`` by name, expiry and age at the TTL boundary, every mismatch reason, the
truncation and schema errors of ``decode_entry``, the compression threshold, the bound on
decompressed material, and the secret range and key ids of ``EntryKeys``.

Written from a mutation run (``make mutation``, README).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import replace
from typing import Any

import msgpack
import pytest

from cachesvc.store import (
    CorruptEntryError,
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
    envelope,
)
from cachesvc.store.envelope import (
    _COMPRESS_FROM,
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    MAX_CLOCK_SKEW_S,
    MAX_MATERIAL_BYTES,
)
from cachesvc.store.mac import KEY_ID_SIZE, MAC_SIZE, MAX_SECRET_BYTES, MIN_SECRET_BYTES, key_id
from keying import Scope
from tests.store_helpers import KEYS, TEST_SECRET, make_entry, payload_of, signed

T0 = 1_700_000_000.0




class TestEntryFieldsAreCheckedByName:
    def test_a_scope_that_is_not_a_scope_is_refused_with_how_to_build_one(self) -> None:
        with pytest.raises(InvalidEntryError, match=(
                r"^scope: must be a keying\.Scope; build it with Scope\.for_tenant$")):
            replace(make_entry(), scope="tenant:acme")

    @pytest.mark.parametrize(("changes", "field"), [
        ({"scope": ["tenant", "acme", None]}, "scope"),
        ({"model": 5}, "model"),
        ({"model_version": None}, "model_version"),
        ({"epoch": True}, "epoch"),
        ({"epoch": 1.0}, "epoch"),
        ({"created_at": math.nan}, "created_at"),
        ({"created_at": "1700000000"}, "created_at"),
        ({"created_at": True}, "created_at"),
        ({"ttl": -1.0}, "ttl"),
        ({"ttl": math.inf}, "ttl"),
        ({"digest": b"\x00" * 15}, "digest"),
        ({"digest": b"\x00" * 17}, "digest"),
        ({"digest": "00" * 16}, "digest"),
        ({"material_digest": b"\x00" * 31}, "material_digest"),
        ({"material_digest": bytearray(32)}, "material_digest"),
        ({"adapter": 3}, "adapter"),
    ])
    def test_a_bad_field_is_refused_naming_it(self, changes: dict[str, Any], field: str) -> None:
        with pytest.raises(InvalidEntryError, match=f"^{field}:"):
            replace(make_entry(), **changes)

    @pytest.mark.parametrize(("changes", "message"), [
        ({"model": ""}, "model: '' is not a non-empty string"),
        ({"model_version": None}, "model_version: None is not a non-empty string"),
        ({"epoch": -1}, "epoch: -1 is not a non-negative integer; use the registry's epoch"),
        ({"created_at": "x"}, "created_at: 'x' is not a finite number"),
        ({"ttl": 0}, "ttl: 0 must be a positive number of seconds or None"),
        ({"digest": b""}, "digest: must be 16 bytes (KeyResult.digest)"),
        ({"material_digest": b""}, "material_digest: must be 32 bytes (KeyResult.material_digest)"),
        ({"response": None}, "response/stream: exactly one must be set (a JSON response or a "
                             "recorded stream)"),
        ({"response": []}, "response: must be a dict (the JSON response body)"),
        ({"response": None, "stream": [1]}, "stream: must be a list of chunk dicts"),
        ({"adapter": b"lora"}, "adapter: must be a string or None"),
        ({"material": b""}, "material: must be non-empty bytes (KeyResult.material) or None"),
    ])
    def test_each_refusal_says_what_the_field_must_be(self, changes: dict[str, Any],
                                                      message: str) -> None:
        with pytest.raises(InvalidEntryError) as err:
            replace(make_entry(), **changes)
        assert str(err.value) == message

    def test_a_response_must_be_a_dict_and_a_stream_a_list_of_dicts(self) -> None:
        with pytest.raises(InvalidEntryError, match=r"^response: must be a dict"):
            make_entry(response=[{"choices": []}])  # type: ignore[arg-type]
        with pytest.raises(InvalidEntryError, match=r"^stream: must be a list of chunk dicts"):
            make_entry(stream=({"choices": []},))  # type: ignore[arg-type]
        with pytest.raises(InvalidEntryError, match=r"^stream: must be a list of chunk dicts"):
            make_entry(stream=[{"choices": []}, "data: [DONE]"])  # type: ignore[list-item]

    def test_a_digest_of_the_right_size_an_int_time_and_an_adapter_are_accepted(self) -> None:
        e = replace(make_entry(), created_at=int(T0), ttl=1, adapter="lora-1")
        assert (e.created_at, e.ttl, e.adapter) == (int(T0), 1, "lora-1")

    def test_an_incomplete_answer_is_refused_with_the_fix(self) -> None:
        with pytest.raises(InvalidEntryError,
                           match=r"; store only a complete answer in the OpenAI response shape$"):
            make_entry(response={"choices": [{"index": 0, "message": {"content": "x"}}]})


class TestLifetime:
    def test_an_entry_expires_exactly_at_created_at_plus_ttl(self) -> None:
        e = make_entry(created_at=T0, ttl=10.0)
        assert not e.is_expired(T0 + 9.999)
        assert e.is_expired(T0 + 10.0)
        assert e.is_expired(T0 + 11.0)
        assert not make_entry(ttl=None).is_expired(T0 + 1e12)

    def test_age_counts_seconds_since_creation_and_is_never_negative(self) -> None:
        e = make_entry(created_at=T0)
        assert e.age(T0 + 42.5) == 42.5
        assert e.age(T0) == 0.0
        assert e.age(T0 - 5) == 0.0

    def test_a_ttl_at_the_limit_and_a_clock_within_the_skew_are_fine(self) -> None:
        assert make_entry(ttl=100.0).lifetime_problem(T0, max_ttl_s=100.0) is None
        assert make_entry(ttl=100.5).lifetime_problem(T0, max_ttl_s=100.0) == (
            "ttl 100.5s exceeds limits.max_ttl_seconds=100")
        skewed = make_entry(created_at=T0 + MAX_CLOCK_SKEW_S)
        assert skewed.lifetime_problem(T0, max_ttl_s=1e9) is None
        ahead = make_entry(created_at=T0 + MAX_CLOCK_SKEW_S + 1)
        assert ahead.lifetime_problem(T0, max_ttl_s=1e9) == (
            f"created_at {T0 + MAX_CLOCK_SKEW_S + 1:.0f} is in the future")
        assert make_entry(ttl=None).lifetime_problem(T0, max_ttl_s=1e9) == (
            "entry never expires (ttl is None)")


class TestMismatch:
    def ask(self, entry: Any, **change: Any) -> str | None:
        asked = {"scope": entry.scope, "model": entry.model, "epoch": entry.epoch,
                 "digest": entry.digest, "material_digest": entry.material_digest,
                 "adapter": entry.adapter} | change
        return entry.mismatch(**asked)

    def test_another_entry_name_is_a_collision(self) -> None:
        assert self.ask(make_entry(), digest=b"\x00" * 16) == "collision"

    def test_another_adapter_is_a_collision_either_way(self) -> None:
        plain = make_entry()
        assert self.ask(plain, adapter="lora-1") == "collision"
        tuned = replace(plain, adapter="lora-1")
        assert self.ask(tuned) is None
        assert self.ask(tuned, adapter=None) == "collision"

    def test_scope_is_checked_before_staleness_and_staleness_before_collision(self) -> None:
        e = make_entry()
        assert self.ask(e, scope=Scope.for_tenant("x"), epoch=9, digest=b"\0" * 16) == (
            "cross_scope")
        assert self.ask(e, model="m2", digest=b"\0" * 16) == "stale"
        assert self.ask(e, epoch=e.epoch + 1) == "stale"


class TestDecodeRefusals:
    @pytest.mark.parametrize("raw", ["LLMC", None, 7, [1, 2]])
    def test_what_is_not_bytes_is_foreign(self, raw: object) -> None:
        with pytest.raises(ForeignEntryError, match=f"^expected bytes, got {type(raw).__name__}$"):
            decode_entry(raw, keys=KEYS)  # type: ignore[arg-type]

    @pytest.mark.parametrize("wrap", [bytearray, memoryview])
    def test_a_bytearray_or_a_memoryview_reads_like_bytes(self, wrap: Any) -> None:
        entry = replace(make_entry(), material=b"m" * 3000)
        raw = encode_entry(entry, keys=KEYS)
        read = decode_entry(wrap(raw), keys=KEYS)
        assert read == entry and read.material == b"m" * 3000
        assert read.key_id == KEYS.current_id

    def test_bytes_exactly_at_max_bytes_are_read(self) -> None:
        raw = encode_entry(make_entry(), keys=KEYS)
        assert decode_entry(raw, keys=KEYS, max_bytes=len(raw)) == make_entry()
        with pytest.raises(OversizeEntryError,
                           match=f"^entry of {len(raw)} bytes exceeds "
                                 f"max_entry_bytes={len(raw) - 1}$"):
            decode_entry(raw, keys=KEYS, max_bytes=len(raw) - 1)

    @pytest.mark.parametrize("raw", [b"L", b"LL", b"LLM"])
    def test_a_start_of_the_magic_is_a_truncated_envelope(self, raw: bytes) -> None:
        with pytest.raises(CorruptEntryError, match=f"^truncated envelope: {len(raw)} bytes$"):
            decode_entry(raw, keys=KEYS)

    @pytest.mark.parametrize("raw", [b"", b"X", b"LX", b"llmc\x02"])
    def test_other_short_bytes_are_foreign(self, raw: bytes) -> None:
        with pytest.raises(ForeignEntryError,
                           match=r"^bytes do not start with the LLMC envelope magic$"):
            decode_entry(raw, keys=KEYS)

    def test_the_magic_alone_or_a_partial_header_is_truncated(self) -> None:
        with pytest.raises(CorruptEntryError,
                           match=f"^truncated envelope: 4 bytes, header needs {HEADER_SIZE}$"):
            decode_entry(MAGIC, keys=KEYS)
        raw = encode_entry(make_entry(), keys=KEYS)
        with pytest.raises(CorruptEntryError,
                           match=f"^truncated envelope: {HEADER_SIZE - 1} bytes, header needs "
                                 f"{HEADER_SIZE}$"):
            decode_entry(raw[:HEADER_SIZE - 1], keys=KEYS)

    def test_the_magic_and_another_version_byte_is_another_version_not_truncated(self) -> None:
        with pytest.raises(UnsupportedVersionError,
                           match=f"^envelope format version {FORMAT_VERSION + 1}; this release "
                                 f"reads version {FORMAT_VERSION}$"):
            decode_entry(MAGIC + bytes((FORMAT_VERSION + 1,)), keys=KEYS)
        with pytest.raises(CorruptEntryError,
                           match=f"^truncated envelope: 5 bytes, header needs {HEADER_SIZE}$"):
            decode_entry(MAGIC + bytes((FORMAT_VERSION,)), keys=KEYS)

    def test_a_header_with_an_empty_payload_is_forged_not_parsed(self) -> None:
        raw = encode_entry(make_entry(), keys=KEYS)
        with pytest.raises(ForgedEntryError):
            decode_entry(raw[:HEADER_SIZE], keys=KEYS)

    def test_a_signed_payload_that_is_not_a_map_is_corrupt(self) -> None:
        with pytest.raises(CorruptEntryError, match=r"^payload is not a map$"):
            decode_entry(signed(msgpack.packb([1, 2])), keys=KEYS)

    def test_a_signed_payload_that_is_not_msgpack_is_corrupt(self) -> None:
        with pytest.raises(CorruptEntryError, match=r"^payload is not valid msgpack: "):
            decode_entry(signed(b"\xc1"), keys=KEYS)

    @pytest.mark.parametrize("drop", ["s", "m", "v", "e", "c", "t", "d", "md", "a", "r", "st"])
    def test_a_signed_payload_missing_a_field_is_corrupt(self, drop: str) -> None:
        payload = payload_of(encode_entry(make_entry(), keys=KEYS))
        del payload[drop]
        with pytest.raises(CorruptEntryError, match=r"^payload does not have the entry schema: "):
            decode_entry(signed(msgpack.packb(payload, use_bin_type=True)), keys=KEYS)

    def test_a_signed_payload_with_a_bad_scope_is_corrupt(self) -> None:
        payload = payload_of(encode_entry(make_entry(), keys=KEYS))
        payload["s"] = ["tenant", "", None]
        with pytest.raises(CorruptEntryError, match=r"^payload does not have the entry schema: "):
            decode_entry(signed(msgpack.packb(payload, use_bin_type=True)), keys=KEYS)

    def test_the_decoded_entry_names_the_key_it_was_signed_under(self) -> None:
        assert decode_entry(encode_entry(make_entry(), keys=KEYS), keys=KEYS).key_id == (
            key_id(TEST_SECRET))


class TestStoredMaterial:
    def test_material_from_one_kilobyte_is_compressed_below_it_is_not(self) -> None:
        at = b"a" * _COMPRESS_FROM
        below = b"a" * (_COMPRESS_FROM - 1)
        p_at = payload_of(encode_entry(replace(make_entry(), material=at), keys=KEYS))
        p_below = payload_of(encode_entry(replace(make_entry(), material=below), keys=KEYS))
        assert "kz" in p_at and "k" not in p_at
        assert p_below["k"] == below and "kz" not in p_below
        for m in (at, below):
            raw = encode_entry(replace(make_entry(), material=m), keys=KEYS)
            assert decode_entry(raw, keys=KEYS).material == m

    def test_material_that_inflates_past_the_bound_is_refused(self) -> None:
        bomb = zlib.compress(b"\0" * (MAX_MATERIAL_BYTES + 1), 1)  # 64 MiB from ~300 KB
        payload = payload_of(encode_entry(make_entry(), keys=KEYS)) | {"kz": bomb}
        raw = signed(msgpack.packb(payload, use_bin_type=True))
        with pytest.raises(CorruptEntryError,
                           match=f"^key material is truncated or over {MAX_MATERIAL_BYTES} bytes$"):
            decode_entry(raw, keys=KEYS)
        assert decode_entry(raw, keys=KEYS, material=False).material is None

    def test_material_exactly_at_the_bound_inflates_one_byte_more_does_not(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(envelope, "MAX_MATERIAL_BYTES", 4096)
        payload = payload_of(encode_entry(make_entry(), keys=KEYS))
        at = signed(msgpack.packb(payload | {"kz": zlib.compress(b"a" * 4096)}))
        assert decode_entry(at, keys=KEYS).material == b"a" * 4096
        over = signed(msgpack.packb(payload | {"kz": zlib.compress(b"a" * 4097)}))
        with pytest.raises(CorruptEntryError,
                           match=r"^key material is truncated or over 4096 bytes$"):
            decode_entry(over, keys=KEYS)

    def test_compressed_material_cut_short_is_truncated(self) -> None:
        payload = payload_of(encode_entry(make_entry(), keys=KEYS))
        cut = signed(msgpack.packb(payload | {"kz": zlib.compress(b"a" * 4096)[:-4]}))
        with pytest.raises(CorruptEntryError, match=r"^key material is truncated or over "):
            decode_entry(cut, keys=KEYS)

    def test_bad_compressed_material_is_corrupt_with_the_codec_s_reason(self) -> None:
        payload = payload_of(encode_entry(make_entry(), keys=KEYS)) | {"kz": b"not zlib"}
        with pytest.raises(CorruptEntryError, match=r"^key material does not decompress: "):
            decode_entry(signed(msgpack.packb(payload, use_bin_type=True)), keys=KEYS)
        payload["kz"] = "text"
        with pytest.raises(CorruptEntryError,
                           match=r"^payload does not have the entry schema: kz is not bytes$"):
            decode_entry(signed(msgpack.packb(payload, use_bin_type=True)), keys=KEYS)


class TestEntryKeys:
    def test_secrets_at_both_ends_of_the_range_are_accepted(self) -> None:
        EntryKeys(b"s" * MIN_SECRET_BYTES)
        EntryKeys(b"s" * MAX_SECRET_BYTES)

    @pytest.mark.parametrize("n", [MIN_SECRET_BYTES - 1, MAX_SECRET_BYTES + 1])
    def test_a_secret_outside_the_range_is_refused_with_the_range(self, n: int) -> None:
        with pytest.raises(StoreConfigError, match=f"^cache.secret: {n} bytes; a service secret "
                                                   f"must be {MIN_SECRET_BYTES} to "
                                                   f"{MAX_SECRET_BYTES} bytes"):
            EntryKeys(b"s" * n)
        with pytest.raises(StoreConfigError):
            EntryKeys(b"s" * 32, previous=[b"s" * n])

    def test_a_key_id_is_four_bytes_and_a_mac_thirty_two(self) -> None:
        keys = EntryKeys(b"s" * 32)
        assert keys.current_id == key_id(b"s" * 32) and len(keys.current_id) == KEY_ID_SIZE
        assert len(keys.sign(b"h", b"p")) == MAC_SIZE
        assert key_id(b"s" * 32) != key_id(b"t" * 32)

    def test_the_mac_covers_header_and_payload(self) -> None:
        keys = EntryKeys(b"s" * 32)
        tag = keys.sign(b"head", b"body")
        keys.verify(keys.current_id, tag, b"head", b"body")
        for header, payload in [(b"head", b"bodY"), (b"heaD", b"body"), (b"", b"headbody")]:
            if header + payload == b"headbody":
                continue  # the MAC is over the concatenation
            with pytest.raises(ForgedEntryError,
                               match=r"^entry MAC does not verify: the bytes were not written by a "
                                     r"service holding the secret$"):
                keys.verify(keys.current_id, tag, header, payload)

    def test_the_same_secret_listed_twice_changes_nothing(self) -> None:
        keys = EntryKeys(b"s" * 32, previous=[b"s" * 32, b"t" * 32])
        keys.verify(key_id(b"t" * 32), EntryKeys(b"t" * 32).sign(b"h", b"p"), b"h", b"p")
        assert keys.secret_for(key_id(b"s" * 32)) == b"s" * 32
        assert keys.secret_for(key_id(b"t" * 32)) == b"t" * 32
        assert keys.secret_for(b"\0" * KEY_ID_SIZE) is None

    def test_previous_secrets_verify_but_never_sign(self) -> None:
        old, new = b"o" * 32, b"n" * 32
        rotated = EntryKeys(new, previous=[old])
        tag = EntryKeys(old).sign(b"h", b"p")
        rotated.verify(key_id(old), tag, b"h", b"p")
        assert rotated.current_id == key_id(new)
        assert rotated.sign(b"h", b"p") == EntryKeys(new).sign(b"h", b"p") != tag

    def test_two_secrets_sharing_a_key_id_are_refused(self) -> None:
        # found by a birthday search over 4-byte key ids (about 2**16 tries)
        a, b = b"collide-secret-0000075649", b"collide-secret-0000172028"
        assert key_id(a) == key_id(b)
        with pytest.raises(StoreConfigError, match=(
                r"^cache.previous_secrets: two secrets share a key id; generate a new secret$")):
            EntryKeys(a, previous=[b])

    def test_the_mac_key_is_derived_from_the_secret_under_its_own_name(self) -> None:
        import hashlib

        secret = b"s" * 32
        mac_key = hashlib.blake2b(secret, digest_size=64, person=b"llmc-entry-mac").digest()
        expected = hashlib.blake2b(b"hp", key=mac_key, digest_size=MAC_SIZE).digest()
        assert EntryKeys(secret).sign(b"h", b"p") == expected
        assert key_id(secret) == hashlib.blake2b(secret, digest_size=KEY_ID_SIZE,
                                                 person=b"llmc-entry-kid").digest()

    def test_the_secret_error_says_how_to_make_one(self) -> None:
        with pytest.raises(StoreConfigError) as err:
            EntryKeys(b"s")
        assert str(err.value).endswith(
            "(e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)")

    def test_an_unknown_key_id_is_refused_naming_it(self) -> None:
        with pytest.raises(UnknownKeyError,
                           match=r"^entry is signed under key id 00000000, which is neither "
                                 r"\[cache\] secret nor one of \[cache\] previous_secrets$"):
            KEYS.verify(b"\0" * 4, b"\0" * 32, b"h", b"p")
