"""Tenants and their keys: who is calling, decided only by the bearer key.

Keys are looked up by their SHA-256, then compared with ``hmac.compare_digest``: the time taken
does not depend on how many leading characters of a guess are right.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from dataclasses import dataclass

from cachesvc.errors import AuthError, BadRequestError
from cachesvc.settings import Settings, TenantSettings
from keying import InvalidRequestError, Scope


@dataclass(frozen=True, kw_only=True, slots=True)
class Tenant:
    id: str
    scope_kind: str  # "tenant" or "user"
    cache_nondeterministic: bool
    ttl_seconds: int
    canaries: tuple[str, ...]

    @property
    def tenant_scope(self) -> Scope:
        return _tenant_scope(self.id)

    @classmethod
    def from_settings(cls, t: TenantSettings) -> Tenant:
        return cls(id=t.id, scope_kind=t.scope, cache_nondeterministic=t.cache_nondeterministic,
                   ttl_seconds=t.ttl_seconds, canaries=tuple(t.canaries))

    def scope_for(self, body: object) -> Scope:
        """The request's scope: the tenant, or with scope ``user`` the body's ``user`` in it."""
        if self.scope_kind == "tenant":
            return self.tenant_scope
        user = body.get("user") if isinstance(body, dict) else None
        if not isinstance(user, str) or not user:
            raise BadRequestError(
                f"tenant {self.id!r} caches per user, and the request has no `user` string",
                field="user", fix="send the end user's id in the request's `user` field",
            )
        try:
            return Scope.for_user(self.id, user)
        except InvalidRequestError as exc:  # pragma: no cover - guarded above
            raise BadRequestError(str(exc), field=exc.field, fix=exc.fix) from None


@functools.lru_cache(maxsize=4096)
def _tenant_scope(tenant_id: str) -> Scope:
    return Scope.for_tenant(tenant_id)


def _fingerprint(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class TenantDirectory:
    """Maps bearer keys to tenants, and knows the admin key."""

    def __init__(self, settings: Settings) -> None:
        self._by_key: dict[bytes, Tenant] = {}
        self._tenants: dict[str, Tenant] = {}
        for ts in settings.tenants:
            tenant = Tenant.from_settings(ts)
            self._tenants[tenant.id] = tenant
            for k in ts.api_keys:
                self._by_key[_fingerprint(k)] = tenant
        admin = settings.admin.api_key
        self._admin = _fingerprint(admin) if admin else None
        self._metrics = [_fingerprint(k) for k in (admin, settings.admin.metrics_key) if k]

    def tenants(self) -> list[Tenant]:
        return list(self._tenants.values())

    def get(self, tenant_id: str) -> Tenant | None:
        return self._tenants.get(tenant_id)

    def authenticate(self, authorization: str | None) -> Tenant:
        fp = _fingerprint(_bearer(authorization))
        tenant = self._by_key.get(fp)
        if tenant is None:
            raise AuthError("the API key does not name a tenant", field="Authorization",
                            fix="send Authorization: Bearer <a tenant key from the config>")
        return tenant

    def authenticate_admin(self, authorization: str | None) -> None:
        fp = _fingerprint(_bearer(authorization))
        if self._admin is None or not hmac.compare_digest(fp, self._admin):
            raise AuthError("admin endpoints need the admin key", field="Authorization",
                            fix="send Authorization: Bearer <[admin] api_key from the config>")


    def authenticate_metrics(self, authorization: str | None) -> None:
        fp = _fingerprint(_bearer(authorization))
        if not any(hmac.compare_digest(fp, k) for k in self._metrics):
            raise AuthError("/metrics needs the metrics key or the admin key",
                            field="Authorization",
                            fix="send Authorization: Bearer <[admin] metrics_key or api_key>")


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise AuthError("no API key", field="Authorization",
                        fix="send Authorization: Bearer <key>")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise AuthError("the Authorization header is not a bearer key", field="Authorization",
                        fix="send Authorization: Bearer <key>")
    return key.strip()
