"""Who an entry belongs to. A scope comes from the server's view of the caller, never the body."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from keying.errors import InvalidRequestError

ScopeKind = Literal["tenant", "user", "public"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Scope:
    """``tenant:<id>``, ``user:<tenant>/<user>`` or ``public``.

    The scope is part of the key material *and* of the storage key, so entries of different
    scopes can never meet, whatever their digests.
    """

    kind: ScopeKind
    tenant: str | None = None
    user: str | None = None

    def __post_init__(self) -> None:
        if self.kind == "public":
            if self.tenant is not None or self.user is not None:
                raise InvalidRequestError(
                    "scope", "a public scope names no tenant or user", "drop --tenant/--user"
                )
            return
        if self.kind not in ("tenant", "user"):
            raise InvalidRequestError(
                "scope", f"unknown scope kind {self.kind!r}", "use tenant, user or public"
            )
        if not isinstance(self.tenant, str) or not self.tenant:
            raise InvalidRequestError(
                "scope.tenant", "a tenant or user scope needs a tenant id", "give a tenant id"
            )
        if self.kind == "user":
            if not isinstance(self.user, str) or not self.user:
                raise InvalidRequestError(
                    "scope.user",
                    "a user scope needs a user id",
                    "send the request's `user` field or use scope tenant",
                )
        elif self.user is not None:
            raise InvalidRequestError(
                "scope.user", "a tenant scope names no user", "use scope user to key per user"
            )

    @classmethod
    def for_tenant(cls, tenant: str) -> Scope:
        return cls(kind="tenant", tenant=tenant)

    @classmethod
    def for_user(cls, tenant: str, user: str) -> Scope:
        return cls(kind="user", tenant=tenant, user=user)

    @classmethod
    def public(cls) -> Scope:
        return cls(kind="public")

    @property
    def label(self) -> str:
        """Human-readable form, for logs and explain output only (never a storage key)."""
        if self.kind == "public":
            return "public"
        if self.kind == "tenant":
            return f"tenant:{self.tenant}"
        return f"user:{self.tenant}/{self.user}"

    def as_material(self) -> list[str | None]:
        """The scope's fields, in a fixed order, for key material."""
        return [self.kind, self.tenant, self.user]

    @classmethod
    def from_material(cls, parts: Any) -> Scope:
        """The scope :meth:`as_material` wrote. Raises ``ValueError`` (an
        ``InvalidRequestError`` for a bad kind or id) or ``TypeError`` on anything else."""
        kind, tenant, user = parts
        return cls(kind=kind, tenant=tenant, user=user)
