"""The stored form of a cached response: a versioned msgpack envelope, authenticated by a
keyed MAC, with the entry's provenance.

Layout::

    b"LLMC" magic (4) | format version (1) | key id (4) | MAC (32) | msgpack payload

The MAC (:mod:`cachesvc.store.mac`, keyed BLAKE2b under the service secret) covers the magic,
the version, the key id and the whole payload: metadata and answer. It is checked before the
payload is parsed, so bytes that anyone but the service wrote, an answer moved onto another
entry's metadata, or a flipped bit, are refused before any of their content is trusted.

An entry is validated when it is built, on the fill path and on every read alike: its fields,
and its answer against the OpenAI response shape (:mod:`cachesvc.store.answer`). So the read
side refuses exactly what the write side would never have written.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import msgpack

from cachesvc.store.answer import answer_problem, describe
from cachesvc.store.errors import (
    CorruptEntryError,
    ForeignEntryError,
    InvalidEntryError,
    OversizeEntryError,
    UnsupportedVersionError,
)
from cachesvc.store.mac import KEY_ID_SIZE, MAC_SIZE, EntryKeys
from keying import Scope
from keying.errors import InvalidRequestError

MAGIC = b"LLMC"
#: Version 2 added the MAC; version 1 entries (an unkeyed checksum) are refused, never served.
FORMAT_VERSION = 2
_HEADER = struct.Struct(f">4sB{KEY_ID_SIZE}s{MAC_SIZE}s")
HEADER_SIZE = _HEADER.size  # 41
_SIGNED_HEADER = 4 + 1 + KEY_ID_SIZE  # the header bytes the MAC covers (all but the MAC)
#: How far in the future a ``created_at`` may lie (clock skew between replicas).
MAX_CLOCK_SKEW_S = 300.0
DIGEST_SIZE = 16
MATERIAL_DIGEST_SIZE = 32
#: Key material this long or longer is stored compressed when that is smaller.
_COMPRESS_FROM = 1024
#: Bound on decompressed key material (a request is at most [limits] max_request_bytes).
MAX_MATERIAL_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, kw_only=True, slots=True)
class Entry:
    """One cached response with its provenance. Exactly one of ``response`` / ``stream`` is set.

    ``created_at`` is wall-clock Unix seconds (entries outlive processes); ``ttl`` is seconds or
    ``None`` for no expiry. ``stream`` is the list of recorded SSE chunk dicts, replayed as is.
    """

    scope: Scope
    model: str
    model_version: str
    epoch: int
    created_at: float
    ttl: float | None
    digest: bytes
    material_digest: bytes
    response: dict[str, Any] | None = None
    stream: list[dict[str, Any]] | None = None
    adapter: str | None = None
    #: The framed key material the entry was filled for (``KeyResult.material``), when the
    #: service keeps it (``[cache] store_material``): it lets the offline scan recompute both
    #: digests and read the request back, to recompute the answer. It holds the request's
    #: keyed fields (the prompt included), so the store holds prompts as well as answers.
    material: bytes | None = None
    #: The key id the entry's MAC was made under (set by :func:`decode_entry`; not stored in
    #: the payload, and not part of equality).
    key_id: bytes = field(default=b"", compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.scope, Scope):
            raise InvalidEntryError("scope: must be a keying.Scope; build it with Scope.for_tenant")
        for name in ("model", "model_version"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise InvalidEntryError(f"{name}: {value!r} is not a non-empty string")
        if isinstance(self.epoch, bool) or not isinstance(self.epoch, int) or self.epoch < 0:
            raise InvalidEntryError(
                f"epoch: {self.epoch!r} is not a non-negative integer; use the registry's epoch"
            )
        if not _finite(self.created_at):
            raise InvalidEntryError(f"created_at: {self.created_at!r} is not a finite number")
        if self.ttl is not None and (not _finite(self.ttl) or self.ttl <= 0):
            raise InvalidEntryError(f"ttl: {self.ttl!r} must be a positive number of seconds or "
                                    "None")
        if not isinstance(self.digest, bytes) or len(self.digest) != DIGEST_SIZE:
            raise InvalidEntryError(f"digest: must be {DIGEST_SIZE} bytes (KeyResult.digest)")
        if (
            not isinstance(self.material_digest, bytes)
            or len(self.material_digest) != MATERIAL_DIGEST_SIZE
        ):
            raise InvalidEntryError(
                f"material_digest: must be {MATERIAL_DIGEST_SIZE} bytes (KeyResult.material_digest)"
            )
        if (self.response is None) == (self.stream is None):
            raise InvalidEntryError(
                "response/stream: exactly one must be set (a JSON response or a recorded stream)"
            )
        if self.response is not None and not isinstance(self.response, dict):
            raise InvalidEntryError("response: must be a dict (the JSON response body)")
        if self.stream is not None and (
            not isinstance(self.stream, list) or not all(isinstance(c, dict) for c in self.stream)
        ):
            raise InvalidEntryError("stream: must be a list of chunk dicts")
        if self.adapter is not None and not isinstance(self.adapter, str):
            raise InvalidEntryError("adapter: must be a string or None")
        if self.material is not None and (not isinstance(self.material, bytes)
                                          or not self.material):
            raise InvalidEntryError("material: must be non-empty bytes (KeyResult.material) or "
                                    "None")
        problem = answer_problem(response=self.response, stream=self.stream)
        if problem is not None:
            raise InvalidEntryError(f"{describe(problem)}; store only a complete answer in the "
                                    "OpenAI response shape")

    def is_expired(self, now: float) -> bool:
        """True once wall-clock ``now`` is at or past ``created_at + ttl``."""
        return self.ttl is not None and now >= self.created_at + self.ttl

    def lifetime_problem(self, now: float, *, max_ttl_s: float) -> str | None:
        """Why this entry's lifetime is one the fill path never writes, or None: no TTL, a TTL
        over ``max_ttl_s`` (the largest any tenant may have), or created in the future."""
        if self.ttl is None:
            return "entry never expires (ttl is None)"
        if self.ttl > max_ttl_s:
            return f"ttl {self.ttl:g}s exceeds limits.max_ttl_seconds={max_ttl_s:g}"
        if self.created_at > now + MAX_CLOCK_SKEW_S:
            return f"created_at {self.created_at:.0f} is in the future"
        return None

    def age(self, now: float) -> float:
        """Seconds since the entry was created (never negative, for the ``Age`` header)."""
        return max(0.0, now - self.created_at)

    def mismatch(
        self,
        *,
        scope: Scope,
        model: str,
        epoch: int,
        digest: bytes,
        material_digest: bytes,
        adapter: str | None = None,
    ) -> str | None:
        """Why this entry must not answer a request with this key, or None if it may.

        The reason is an auditor finding kind: ``cross_scope``, ``stale`` (epoch or model),
        ``collision`` (same name, different material).
        """
        if self.scope != scope:
            return "cross_scope"
        if self.model != model or self.epoch != epoch:
            return "stale"
        if self.digest != digest or self.material_digest != material_digest:
            return "collision"
        if self.adapter != adapter:
            return "collision"
        return None


def _finite(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def encode_entry(entry: Entry, *, keys: EntryKeys) -> bytes:
    """Serialise ``entry`` into an envelope signed under ``keys``' current key."""
    fields: dict[str, Any] = {
        "s": entry.scope.as_material(),
        "m": entry.model,
        "v": entry.model_version,
        "e": entry.epoch,
        "c": float(entry.created_at),
        "t": None if entry.ttl is None else float(entry.ttl),
        "d": entry.digest,
        "md": entry.material_digest,
        "a": entry.adapter,
        "r": entry.response,
        "st": entry.stream,
    }
    if entry.material is not None:
        # NOTE: optional, so entries without it are byte-identical to earlier ones and every
        # reader of format version 1 reads both (unknown map keys are ignored). Material is
        # mostly prompt text: past 1 KB it is stored zlib-compressed when that is smaller.
        m = entry.material
        packed = zlib.compress(m, 1) if len(m) >= _COMPRESS_FROM else m
        if len(packed) < len(m):
            fields["kz"] = packed
        else:
            fields["k"] = m
    payload = msgpack.packb(fields, use_bin_type=True)
    signed = MAGIC + bytes((FORMAT_VERSION,)) + keys.current_id
    return signed + keys.sign(signed, payload) + payload


def decode_entry(raw: bytes, *, keys: EntryKeys, material: bool = True,
                 max_bytes: int | None = None) -> Entry:
    """Verify and parse an envelope. ``material=False`` leaves the key material out
    (``Entry.material`` is None, nothing is decompressed): the hit path never reads it.
    ``max_bytes``: bytes longer than this are refused before anything else is done with them.

    Raises :class:`OversizeEntryError`, :class:`ForeignEntryError` (not ours),
    :class:`UnsupportedVersionError` (ours, another format version),
    :class:`UnknownKeyError` / :class:`ForgedEntryError` (the MAC) or
    :class:`CorruptEntryError` (truncated, schema, answer shape). Never returns a partially
    trusted entry.
    """
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise ForeignEntryError(f"expected bytes, got {type(raw).__name__}")
    if max_bytes is not None and len(raw) > max_bytes:
        raise OversizeEntryError(f"entry of {len(raw)} bytes exceeds max_entry_bytes={max_bytes}")
    if not isinstance(raw, bytes):
        raw = bytes(raw)
    if raw[:4] != MAGIC:
        if len(raw) < 4 and MAGIC.startswith(raw) and raw:
            raise CorruptEntryError(f"truncated envelope: {len(raw)} bytes")
        raise ForeignEntryError("bytes do not start with the LLMC envelope magic")
    if len(raw) < 5:
        raise CorruptEntryError(f"truncated envelope: {len(raw)} bytes, header needs {HEADER_SIZE}")
    version = raw[4]
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"envelope format version {version}; this release reads version {FORMAT_VERSION}"
        )
    if len(raw) < HEADER_SIZE:
        raise CorruptEntryError(f"truncated envelope: {len(raw)} bytes, header needs {HEADER_SIZE}")
    _, _, kid, tag = _HEADER.unpack_from(raw)
    view = memoryview(raw)
    payload = view[HEADER_SIZE:]
    keys.verify(kid, tag, view[:_SIGNED_HEADER], payload)
    try:
        obj = msgpack.unpackb(payload, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise CorruptEntryError(f"payload is not valid msgpack: {exc}") from exc
    return _from_payload(obj, material, kid)


def _inflate(packed: Any) -> bytes:
    if not isinstance(packed, bytes):
        raise CorruptEntryError("payload does not have the entry schema: kz is not bytes")
    d = zlib.decompressobj()
    try:
        out = d.decompress(packed, MAX_MATERIAL_BYTES)
    except zlib.error as exc:
        raise CorruptEntryError(f"key material does not decompress: {exc}") from exc
    if d.unconsumed_tail or not d.eof:
        raise CorruptEntryError(f"key material is truncated or over {MAX_MATERIAL_BYTES} bytes")
    return out


def _from_payload(obj: Any, with_material: bool, kid: bytes) -> Entry:
    if not isinstance(obj, dict):
        raise CorruptEntryError("payload is not a map")
    try:
        return Entry(
            scope=Scope.from_material(obj["s"]),
            model=obj["m"],
            model_version=obj["v"],
            epoch=obj["e"],
            created_at=obj["c"],
            ttl=obj["t"],
            digest=obj["d"],
            material_digest=obj["md"],
            adapter=obj["a"],
            response=obj["r"],
            stream=obj["st"],
            material=None if not with_material
            else _inflate(obj["kz"]) if "kz" in obj else obj.get("k"),
            key_id=kid,
        )
    except CorruptEntryError:
        raise  # the key material's own reason (_inflate), not a schema problem
    except (KeyError, TypeError, ValueError, InvalidEntryError, InvalidRequestError) as exc:
        raise CorruptEntryError(f"payload does not have the entry schema: {exc}") from exc
