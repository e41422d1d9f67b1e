"""Admin endpoints (admin key only): model rollouts, the model listing, tenant purges."""

from __future__ import annotations

from fastapi import APIRouter

import structlog

from cachesvc.api.deps import AdminDep, Services, ServicesDep
from cachesvc.api.schemas import ERROR_RESPONSES, ModelList, ModelVersion, PurgeResult, RolloutRequest
from cachesvc.errors import NotFoundError

router = APIRouter(prefix="/admin", tags=["admin"])
log = structlog.get_logger()


# NOTE: `:path`: gateways name models by provider path (LiteLLM: "openai/gpt-4o").
@router.post("/models/{model:path}/rollout", response_model=ModelVersion,
             responses={**ERROR_RESPONSES, 404: {"description": "Unknown model, no create."}})
async def rollout(model: str, body: RolloutRequest, services: ServicesDep,
                  _: AdminDep) -> ModelVersion:
    """Make ``version`` current for ``model`` under a fresh epoch: every older entry (and every
    prefix block of the old epoch) becomes unreachable at once, rollbacks included."""
    version, epoch = await services.versions.rollout(model, body.version, create=body.create)
    # The new epoch already makes old entries unreachable; deleting them only returns memory,
    # so it runs in the background and its failure is a log line, not a failed rollout.
    services.spawn(_purge_old_epochs(services, model, epoch), name=f"purge-{model}")
    return ModelVersion(model=model, version=version, epoch=epoch)


async def _purge_old_epochs(services: Services, model: str, epoch: int) -> None:
    try:
        deleted = await services.store.delete_model(model, before_epoch=epoch)
        log.info("old_epochs_purged", model=model, before_epoch=epoch, deleted=deleted)
    except Exception as exc:  # noqa: BLE001 - memory reclaim only; retried by the next rollout
        log.warning("old_epoch_purge_failed", model=model, error=f"{type(exc).__name__}")


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
