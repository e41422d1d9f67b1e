"""``/healthz`` (the process answers), ``/readyz`` (and reports the store), ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from cachesvc.api.deps import MetricsDep, ServicesDep
from cachesvc.api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, response_model_exclude_none=True)
async def healthz() -> Health:
    """Liveness: the process is up and its event loop answers."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health)
async def readyz(services: ServicesDep) -> Health:
    """Readiness. A dead store does not make the service unready: it serves misses from the
    upstream (``degraded``) and the breaker probes for the store's return."""
    state = services.cache.guard.breaker.state
    return Health(status="ok" if state == "closed" else "degraded", store=_STORE[state],
                  breaker=state, detail={"single_flights": len(services.flights)})


#: What each breaker state means for the store, in the words /readyz answers with.
_STORE = {"closed": "available", "open": "unavailable", "half_open": "probing"}


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text format."},
                       401: {"description": "No metrics key or admin key."}})
async def metrics(_: MetricsDep) -> Response:
    """Prometheus metrics of every part (default registry). Needs ``[admin] metrics_key`` or
    the admin key: the labels name every tenant with its hit and miss counts."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
