"""FastAPI dependencies. Long-lived objects live on ``app.state.services`` (built in the app's
lifespan); tests swap any of these with ``app.dependency_overrides``."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cachesvc import access_log
from cachesvc.api.responses import EncodedBodies
from cachesvc.errors import BadRequestError, TooLargeError
from cachesvc.fill_token import FillTokenSigner
from cachesvc.response_cache import ResponseCache
from cachesvc.settings import Settings
from cachesvc.single_flight import SingleFlight
from cachesvc.tenants import Tenant, TenantDirectory
from cachesvc.upstream import Upstream

if TYPE_CHECKING:
    from cachesvc.models import ModelVersions
    from cachesvc.store.base import ResponseStore


@dataclass
class Services:
    settings: Settings
    tenants: TenantDirectory
    cache: ResponseCache
    upstream: Upstream
    flights: SingleFlight
    signer: FillTokenSigner
    versions: ModelVersions
    store: ResponseStore
    #: Background work started by requests (old-epoch purges), kept referenced until done.
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    #: Hot entries' answers, encoded once (the hit routes' bodies).
    bodies: EncodedBodies = field(default_factory=EncodedBodies)

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.background.add(task)
        task.add_done_callback(self.background.discard)


async def get_services(request: Request) -> Services:
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None:  # pragma: no cover - only before lifespan ran
        raise RuntimeError("the app's lifespan has not run; start it with uvicorn or TestClient")
    return services


# NOTE: every dependency is ``async def``: FastAPI runs a plain ``def`` dependency in a thread
# pool, which costs more than the whole cache lookup.
ServicesDep = Annotated[Services, Depends(get_services)]

_bearer = HTTPBearer(auto_error=False, description="A tenant API key from the config.")
_admin_bearer = HTTPBearer(auto_error=False, scheme_name="AdminKey",
                           description="The [admin] api_key from the config.")
_metrics_bearer = HTTPBearer(auto_error=False, scheme_name="MetricsKey",
                             description="The [admin] metrics_key (or api_key) from the config.")


def _auth_header(creds: HTTPAuthorizationCredentials | None) -> str | None:
    return f"{creds.scheme} {creds.credentials}" if creds is not None else None


async def current_tenant(
    request: Request,
    services: ServicesDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    tenant = services.tenants.authenticate(_auth_header(creds))
    access_log.note(request.scope, tenant=tenant.id)
    return tenant


async def require_admin(
    request: Request,
    services: ServicesDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_admin_bearer)],
) -> None:
    services.tenants.authenticate_admin(_auth_header(creds))
    access_log.note(request.scope, tenant=access_log.ADMIN)


async def require_metrics_key(
    services: ServicesDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_metrics_bearer)],
) -> None:
    services.tenants.authenticate_metrics(_auth_header(creds))


TenantDep = Annotated[Tenant, Depends(current_tenant)]
MetricsDep = Annotated[None, Depends(require_metrics_key)]


def hot_path_caller(request: Request) -> tuple[Services, Tenant]:
    """Services and tenant for the hot routes (proxy, lookup), resolved without FastAPI's
    dependency solver.

    NOTE: solving even three small dependencies per request cost more CPU than the cache hit
    itself (bench/service.py), so the hot routes call this directly. Tests swap the parts by
    passing them to ``create_app`` (or by overriding ``hot_path_caller`` itself, which this
    honours), and the OpenAPI schema still declares the bearer scheme for these routes.
    """
    override = request.app.dependency_overrides.get(hot_path_caller)
    if override is not None:
        return override(request)  # type: ignore[no-any-return]
    services = getattr(request.app.state, "services", None)
    if services is None:  # pragma: no cover - only before lifespan ran
        raise RuntimeError("the app's lifespan has not run; start it with uvicorn or TestClient")
    tenant = services.tenants.authenticate(request.headers.get("authorization"))
    access_log.note(request.scope, tenant=tenant.id)
    return services, tenant


#: OpenAPI fragment for routes that authenticate through ``hot_path_caller``.
AdminDep = Annotated[None, Depends(require_admin)]


async def read_json_body(request: Request, limit: int) -> tuple[bytes, Any]:
    """The request body's bytes and JSON, refusing bodies over ``limit`` bytes before reading
    them all."""
    import orjson

    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit():
        if int(declared) > limit:
            raise _too_large(limit)
        raw = await request.body()
    else:  # chunked upload: count as it arrives, stop at the limit
        chunks: list[bytes] = []
        size = 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise _too_large(limit)
            chunks.append(part)
        raw = b"".join(chunks)
    if not raw:
        raise BadRequestError("the request body is empty", field="body",
                              fix="send a JSON object with Content-Type: application/json")
    try:
        return raw, orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequestError(f"the request body is not valid JSON ({exc.msg} at {exc.pos})",
                              field="body", fix="send a valid JSON object") from None


def _too_large(limit: int) -> TooLargeError:
    return TooLargeError(f"the request body exceeds limits.max_request_bytes={limit}",
                         field="body", fix="send a smaller request or raise the limit")

