"""Fill tokens: a lookup's signed permission to store one response under one key.

A token binds the scope, the entry digest, the material digest, the model, its epoch and an
expiry, signed with HMAC-SHA256 under the service secret. A gateway cannot forge one for a key
it computed itself, reuse one for another scope, or store under an epoch that has since passed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import orjson

from cachesvc.errors import UnprocessableError

_VERSION = "ft1"


@dataclass(frozen=True, kw_only=True, slots=True)
class FillGrant:
    """What a valid fill token permits."""

    tenant: str
    scope: list[str | None]
    digest: bytes
    material_digest: bytes
    model: str
    epoch: int
    stream: bool
    expires_at: float
    ttl_seconds: int


class FillTokenSigner:
    """Signs and verifies fill tokens. ``clock`` is wall-clock seconds (tokens cross processes).

    ``secret`` signs; tokens signed under a ``previous`` secret still verify, so a secret
    rotation does not refuse the tokens lookups handed out just before it."""

    def __init__(self, secret: bytes, *, previous: Sequence[bytes] = (), ttl_s: float = 300.0,
                 clock: Callable[[], float] = time.time) -> None:
        if len(secret) < 16:
            raise ValueError("fill token secret must be at least 16 bytes")
        self._key, *self._previous = [hashlib.blake2b(s, person=b"cachesvc-fill").digest()
                                      for s in (secret, *previous)]
        self._ttl = ttl_s
        self._clock = clock

    def sign(self, grant: FillGrant | None = None, **fields: object) -> str:
        if grant is None:
            fields.setdefault("expires_at", self._clock() + self._ttl)
            grant = FillGrant(**fields)  # type: ignore[arg-type]
        payload = orjson.dumps(
            [_VERSION, grant.tenant, grant.scope, grant.digest.hex(), grant.material_digest.hex(),
             grant.model, grant.epoch, grant.stream, grant.expires_at, grant.ttl_seconds]
        )
        mac = hmac.new(self._key, payload, hashlib.sha256).digest()
        return _b64(payload) + "." + _b64(mac)

    def verify(self, token: object) -> FillGrant:
        """Return the grant, or raise ``UnprocessableError`` naming ``fill_token`` and the fix."""
        if not isinstance(token, str) or token.count(".") != 1:
            raise _bad("is not a fill token")
        p64, m64 = token.split(".")
        try:
            payload, mac = _unb64(p64), _unb64(m64)
        except ValueError:
            raise _bad("is not a fill token") from None
        if not any(hmac.compare_digest(mac, hmac.new(key, payload, hashlib.sha256).digest())
                   for key in (self._key, *self._previous)):
            raise _bad("has an invalid signature")
        try:
            v, tenant, scope, dg, mdg, model, epoch, stream, exp, ttl = orjson.loads(payload)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            raise _bad("is malformed") from None
        if v != _VERSION:
            raise _bad("has an unknown version")
        if self._clock() > exp:
            raise _bad("has expired")
        return FillGrant(tenant=tenant, scope=scope, digest=bytes.fromhex(dg),
                         material_digest=bytes.fromhex(mdg), model=model, epoch=epoch,
                         stream=stream, expires_at=exp, ttl_seconds=ttl)


def _bad(problem: str) -> UnprocessableError:
    return UnprocessableError(
        f"fill_token {problem}", field="fill_token",
        fix="call /v1/cache/lookup again and store with the fill_token it returns",
    )


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _unb64(s: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a bad token
        raise ValueError(str(exc)) from None
