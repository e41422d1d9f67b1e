"""Admin endpoints (admin key only): model rollouts, the model listing, purges by tenant or
model, and the offline scan run inside the service (the only way to scan an embedded store).
``cachesvc models|purge|audit scan --url`` call these."""

from __future__ import annotations

from typing import Annotated

import structlog
from fastapi import APIRouter, Query

from cachesvc.api.deps import AdminDep, Services, ServicesDep
from cachesvc.api.schemas import (
    ERROR_RESPONSES,
    ModelList,
    ModelPurgeQuery,
    ModelPurgeResult,
    ModelVersion,
    PurgeResult,
    RolloutRequest,
    ScanQuery,
    ScanSummary,
)
from cachesvc.errors import BadRequestError, NotFoundError

router = APIRouter(prefix="/admin", tags=["admin"])
log = structlog.get_logger()


# NOTE: `:path`: gateways name models by provider path (LiteLLM: "openai/gpt-4o").
@router.post("/models/{model:path}/rollout", response_model=ModelVersion,
             responses={**ERROR_RESPONSES, 404: {"description": "Unknown model, no create."}})
async def rollout(model: str, body: RolloutRequest, services: ServicesDep,
                  _: AdminDep) -> ModelVersion:
    """Make ``version`` current for ``model`` under a fresh epoch: every older entry (and every
    prefix block of the old epoch) becomes unreachable at once, rollbacks included."""
    version, epoch = await services.versions.rollout(model, body.version,
                                                     idempotent=body.idempotent,
                                                     create=body.create)
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
    return ModelList(models=[ModelVersion(model=m.model, version=m.version, epoch=m.epoch)
                             for m in await services.versions.list()])


@router.delete("/tenants/{tenant}/entries", response_model=PurgeResult,
               responses={**ERROR_RESPONSES, 404: {"description": "Unknown tenant."}})
async def purge_tenant(tenant: str, services: ServicesDep, _: AdminDep) -> PurgeResult:
    """Delete every entry of ``tenant`` (tenant and user scopes), e.g. for a deletion request."""
    if services.tenants.get(tenant) is None:
        raise NotFoundError(f"no tenant {tenant!r} in the config", field="tenant",
                            fix="use a tenant id from the [[tenants]] config")
    deleted = await services.store.delete_tenant(tenant)
    return PurgeResult(tenant=tenant, deleted=deleted)


# NOTE: 404 is documented: a model name no route can hold (a newline, say) is not found.
@router.delete("/models/{model:path}/entries", response_model=ModelPurgeResult,
               responses={**ERROR_RESPONSES, 404: {"description": "No route for that model name."}})
async def purge_model(model: str, query: Annotated[ModelPurgeQuery, Query()],
                      services: ServicesDep, _: AdminDep) -> ModelPurgeResult:
    """Delete ``model``'s entries: all of them, those below ``before_epoch``, or with
    ``old_epochs=true`` those below the model's current epoch (what a rollout reclaims)."""
    before_epoch, old_epochs = query.before_epoch, query.old_epochs
    if old_epochs and before_epoch is not None:
        raise BadRequestError("old_epochs and before_epoch were both given", field="old_epochs",
                              fix="pass one of them")
    if old_epochs:
        before_epoch = (await services.versions.current(model, fresh=True))[1]
    deleted = await services.store.delete_model(model, before_epoch=before_epoch)
    return ModelPurgeResult(model=model, before_epoch=before_epoch, deleted=deleted)


@router.post("/scan", response_model=ScanSummary, responses=ERROR_RESPONSES)
async def scan(query: Annotated[ScanQuery, Query()], services: ServicesDep,
               _: AdminDep) -> ScanSummary:
    """Scan every entry of the service's own store (embedded or Redis) as ``cachesvc audit
    scan`` does, record the findings in the service's journal and save the result for
    reports. Runs on the service's event loop: on a large store it competes with requests."""
    from cachesvc.auditing import findings_path_of, journal_for, run_scan

    settings = services.settings
    journal = journal_for(settings.redis, findings_path_of(settings))
    target = "embedded store" if not settings.redis.store_url else "the service's Redis store"
    keys = services.cache.keys
    secret = keys.secret_for(keys.current_id)
    assert secret is not None  # the current key is always one of its keys
    result = await run_scan(settings, services.store, journal, registry=services.versions,
                            secret=secret, target=target, batch=query.batch)
    return ScanSummary(run_id=result.run_id, target=result.target, entries=result.entries,
                       findings=result.findings, findings_by_kind=dict(result.findings_by_kind),
                       unreadable=result.unreadable, reclaimable=result.reclaimable,
                       material_checked=result.material_checked)
