"""Admin endpoints (admin key only): model rollouts, the model listing, tenant purges."""

from __future__ import annotations

from fastapi import APIRouter

from cachesvc.api.deps import AdminDep, ServicesDep
from cachesvc.api.schemas import ERROR_RESPONSES, ModelList, ModelVersion, PurgeResult, RolloutRequest
from cachesvc.errors import NotFoundError

router = APIRouter(prefix="/admin", tags=["admin"])


@router.post("/models/{model}/rollout", response_model=ModelVersion, responses=ERROR_RESPONSES)
async def rollout(model: str, body: RolloutRequest, services: ServicesDep,
                  _: AdminDep) -> ModelVersion:
    """Make ``version`` current for ``model`` under a fresh epoch: every older entry (and every
    prefix block of the old epoch) becomes unreachable at once, rollbacks included."""
    version, epoch = await services.versions.rollout(model, body.version)
    return ModelVersion(model=model, version=version, epoch=epoch)


@router.get("/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def models(services: ServicesDep, _: AdminDep) -> ModelList:
    """Every model the registry knows, with its current version and epoch."""
    return ModelList(models=[ModelVersion(**m) for m in await services.versions.list()])


@router.delete("/tenants/{tenant}/entries", response_model=PurgeResult,
               responses={**ERROR_RESPONSES, 404: {"description": "Unknown tenant."}})
async def purge_tenant(tenant: str, services: ServicesDep, _: AdminDep) -> PurgeResult:
    """Delete every entry of ``tenant`` (tenant and user scopes), e.g. for a deletion request."""
    if services.tenants.get(tenant) is None:
        raise NotFoundError(f"no tenant {tenant!r} in the config", field="tenant",
                            fix="use a tenant id from the [[tenants]] config")
    deleted = await services.store.delete_tenant(tenant)
    return PurgeResult(tenant=tenant, deleted=deleted)
