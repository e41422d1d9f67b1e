"""Errors raised by the service. Each maps to one HTTP status in ``cachesvc.api.errors``."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of every error the service raises on purpose."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, field: str | None = None, fix: str | None = None) -> None:
        self.message = message
        self.field = field
        self.fix = fix
        super().__init__(message)


class AuthError(ServiceError, PermissionError):
    """Raised when the bearer key is missing or does not name a tenant (or the admin)."""

    status = 401
    code = "invalid_api_key"


class BadRequestError(ServiceError, ValueError):
    """Raised when a request is malformed; ``field`` names the part and ``fix`` the remedy."""

    status = 400
    code = "invalid_request"


class TooLargeError(ServiceError, ValueError):
    """Raised when a request body or an entry exceeds a configured limit."""

    status = 413
    code = "too_large"


class UnprocessableError(ServiceError, ValueError):
    """Raised when a well-formed request cannot be honoured (bad fill token, TTL too long)."""

    status = 422
    code = "unprocessable"


class OnlyIfCachedMissError(ServiceError, LookupError):
    """Raised for ``Cache-Control: only-if-cached`` when there is no usable entry."""

    status = 504
    code = "not_cached"


class UpstreamError(ServiceError, ConnectionError):
    """Raised when the upstream answers with an error or cannot be reached.

    ``status`` and ``body`` are the upstream's own, passed through to the client unchanged.
    """

    code = "upstream_error"

    def __init__(self, status: int, body: dict[str, Any], *,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.body = body
        self.headers = headers or {}


class StaleEpochError(ServiceError, LookupError):
    """Raised when a fill token's model epoch has passed: a rollout happened since the lookup."""

    status = 409
    code = "stale_epoch"


class TokenUsedError(ServiceError, LookupError):
    """Raised when a fill token is presented a second time: each permits one store."""

    status = 409
    code = "fill_token_used"


class NotFoundError(ServiceError, LookupError):
    """Raised when an admin call names a tenant or model the service does not know."""

    status = 404
    code = "not_found"


class RegistryConflictError(RuntimeError):
    """Raised at start-up when the configured model version is not the registry's: the
    service refuses to start rather than roll the registry or serve under another version's
    epoch. The message names both versions and both fixes."""


class CacheUnavailableError(ServiceError, ConnectionError):
    """Raised by ``cachesvc.client`` (only when it is asked not to fail open) when the service
    cannot be reached, does not answer within the timeout, or answers with a 5xx."""

    status = 503
    code = "cache_unavailable"
