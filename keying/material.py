"""Key material: everything that decides an answer, framed; and the two digests over it."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack
import orjson

from keying.cacheability import Cacheability, assess
from keying.canonical import (
    UNKEYED_FIELDS,
    CanonicalRequest,
    KeyLimits,
    RequestKind,
    canonicalize,
)
from keying.canonical_json import JSON_EXT
from keying.errors import InvalidMaterialError, InvalidRequestError, KeyingError
from keying.framing import (
    DEFAULT_MATERIAL_SECRET,
    frame_presorted,
    material_digest,
    response_digest,
)
from keying.scope import Scope
from keying.types import MaterialDigest, ResponseDigest

#: Names the material's layout and the digests over it. v2: the material digest is keyed BLAKE3
#: (v1: keyed blake2b), so entries written under v1 have other names and are simply not found.
MATERIAL_VERSION = "llmcache-key/v2"


@dataclass(frozen=True, kw_only=True, slots=True)
class KeyParams:
    """What the server knows about a request that the body must not decide."""

    scope: Scope
    epoch: int = 0
    adapter: str | None = None
    kind: RequestKind | None = None
    allow_nondeterministic: bool = False
    secret: bytes = DEFAULT_MATERIAL_SECRET
    limits: KeyLimits = KeyLimits()


class KeyResult(NamedTuple):
    """A request's key: entry name, verification digest, canonical form and cacheability.

    NOTE: an immutable NamedTuple rather than a frozen dataclass, for the cost of building one
    per request (see ``CanonicalRequest``). Build it by keyword.
    """

    digest: ResponseDigest
    material_digest: MaterialDigest
    material: bytes
    canonical: CanonicalRequest
    scope: Scope
    epoch: int
    adapter: str | None
    cacheability: Cacheability

    @property
    def model(self) -> str:
        return self.canonical.model

    def explain(self) -> dict[str, Any]:
        """A JSON-ready account of the key, for ``cachesvc key explain``."""
        return {
            "digest": self.digest.hex(),
            "material_digest": self.material_digest.hex(),
            "cacheable": self.cacheability.cacheable,
            "reason": self.cacheability.reason,
            "scope": self.scope.label,
            "model": self.canonical.model,
            "epoch": self.epoch,
            "adapter": self.adapter,
            "kind": self.canonical.kind,
            "keyed": self.canonical.fields,
            "unkeyed": list(self.canonical.unkeyed),
            "unkeyed_policy": sorted(UNKEYED_FIELDS),
            "material_version": MATERIAL_VERSION,
            "material_bytes": len(self.material),
        }


def encode_material(
    *, scope: Scope, model: str, epoch: int, adapter: str | None, request: CanonicalRequest
) -> bytes:
    """Frame the key material. Each component is tagged by name and position."""
    if (type(epoch) is not int and (isinstance(epoch, bool) or not isinstance(epoch, int))) \
            or epoch < 0:
        raise InvalidRequestError("epoch", f"{epoch!r} is not a non-negative integer",
                                  "pass the model's epoch from the registry")
    if adapter is not None and not isinstance(adapter, str):
        raise InvalidRequestError("adapter", "must be a string or absent", "pass an adapter id")
    # NOTE: the request's fields are already encoded (canonicalize does it once); the material is
    # the msgpack array [version, scope, model, epoch, adapter, kind, ["request", fields]], built
    # by appending that encoding to the head, byte-identical to packing the whole array.
    return _head(scope, model, epoch, adapter, request.kind) + request.encoded


@functools.lru_cache(maxsize=4096)
def _head(scope: Scope, model: str, epoch: int, adapter: str | None, kind: str) -> bytes:
    # Few distinct heads exist at a time (tenants x models x epochs), so they are cached.
    head = frame_presorted(
        [
            MATERIAL_VERSION,
            ["scope", scope.as_material()],
            ["model", model],
            ["epoch", epoch],
            ["adapter", adapter],
            ["kind", kind],
        ]
    )
    assert head[0] == 0x96  # fixarray of 6
    return b"\x97" + head[1:] + _REQUEST_TAG


_REQUEST_TAG = b"\x92" + frame_presorted("request")


def build_key(body: Any, params: KeyParams) -> KeyResult:
    """Canonicalise ``body`` and build its key under ``params``. Pure; raises on bad input."""
    canonical = canonicalize(body, params.kind, params.limits)
    material = encode_material(
        scope=params.scope,
        model=canonical.model,
        epoch=params.epoch,
        adapter=params.adapter,
        request=canonical,
    )
    # NOTE: KeyResult's fields in order, through _make: a keyword call of a NamedTuple's
    # generated __new__ cost a twentieth of keying a typical request.
    return _make_key_result((
        response_digest(material),  # digest
        material_digest(material, params.secret),  # material_digest
        material,  # material
        canonical,  # canonical
        params.scope,  # scope
        params.epoch,  # epoch
        params.adapter,  # adapter
        assess(canonical, allow_nondeterministic=params.allow_nondeterministic),  # cacheability
    ))


_make_key_result = KeyResult._make
assert KeyResult._fields == ("digest", "material_digest", "material", "canonical", "scope",
                             "epoch", "adapter", "cacheability")


class MaterialParts(NamedTuple):
    """Key material read back: what the key was built from (see :func:`decode_material`)."""

    scope: Scope
    model: str
    epoch: int
    adapter: str | None
    kind: RequestKind
    fields: dict[str, Any]

    def body(self) -> dict[str, Any]:
        """The request as a body that :func:`build_key` accepts: the model and the keyed fields
        (canonical values). Unkeyed fields (``stream``, ``user``, ...) are not in the material:
        by definition they do not change the answer. ``rebuild_key(...).canonical.body(
        minimal=True)`` leaves out the defaults."""
        return {"model": self.model, **self.fields}


def _ext_hook(code: int, data: bytes) -> Any:
    if code != JSON_EXT:
        raise InvalidMaterialError(f"unknown msgpack extension code {code}")
    return orjson.loads(data)


def decode_material(material: bytes) -> MaterialParts:
    """Read framed key material back into its parts. Raises :class:`InvalidMaterialError` when
    the bytes are not material of this version (never a partial result)."""
    try:
        parts = msgpack.unpackb(material, raw=False, ext_hook=_ext_hook, strict_map_key=True)
    except InvalidMaterialError:
        raise
    except Exception as exc:  # msgpack and orjson raise several unrelated types for bad input
        raise InvalidMaterialError(f"not msgpack: {exc}") from exc
    names = ("scope", "model", "epoch", "adapter", "kind", "request")
    if (type(parts) is not list or len(parts) != 7 or parts[0] != MATERIAL_VERSION
            or any(type(p) is not list or len(p) != 2 or p[0] != n
                   for p, n in zip(parts[1:], names, strict=True))):
        raise InvalidMaterialError(f"not {MATERIAL_VERSION} material (version, six tagged parts)")
    (_, scope, model, epoch, adapter, kind, request) = (p if i == 0 else p[1]
                                                       for i, p in enumerate(parts))
    try:
        scope_v = Scope.from_material(scope)
    except (TypeError, ValueError, KeyingError) as exc:
        raise InvalidMaterialError(f"scope: {exc}") from exc
    if type(model) is not str or not model:
        raise InvalidMaterialError("model: not a non-empty string")
    if type(epoch) is not int or epoch < 0:
        raise InvalidMaterialError("epoch: not a non-negative integer")
    if adapter is not None and type(adapter) is not str:
        raise InvalidMaterialError("adapter: not a string or nil")
    if kind not in ("chat", "completion", "generic"):
        raise InvalidMaterialError(f"kind: {kind!r} is not chat, completion or generic")
    if type(request) is not dict:
        raise InvalidMaterialError("request: not a map of fields")
    return MaterialParts(scope=scope_v, model=model, epoch=epoch, adapter=adapter, kind=kind,
                         fields=request)


def rebuild_key(material: bytes, *, secret: bytes = DEFAULT_MATERIAL_SECRET) -> KeyResult:
    """The key that ``material`` is the material of, rebuilt from its request with
    :func:`build_key`. Raises :class:`InvalidMaterialError` when the material does not decode,
    or when keying its request again does not give back the same bytes (it was not built by
    this release's keying, or it was altered)."""
    parts = decode_material(material)
    try:
        key = build_key(parts.body(), KeyParams(
            scope=parts.scope, epoch=parts.epoch, adapter=parts.adapter, kind=parts.kind,
            secret=secret, limits=KeyLimits(max_bytes=max(len(material), 1))))
    except KeyingError as exc:
        raise InvalidMaterialError(f"its request does not key again: {exc}") from exc
    if key.material != material:
        raise InvalidMaterialError("keying its request again gives other material")
    return key
