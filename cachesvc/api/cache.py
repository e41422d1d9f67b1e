"""``POST /v1/cache/lookup`` and ``POST /v1/cache/store``: the cache for gateways that call the
model themselves. A store needs the signed fill token its lookup returned."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from cachesvc import access_log
from cachesvc.api.deps import ServicesDep, TenantDep, hot_path_caller, read_json_body
from cachesvc.api.lean import lean
from cachesvc.api.responses import EncodedJsonResponse, OrjsonResponse
from cachesvc.api.schemas import (
    BEARER_SECURITY,
    ERROR_RESPONSES,
    LookupRequest,
    LookupResponse,
    StoreRequest,
    StoreResponse,
)
from cachesvc.cache_control import parse_cache_control
from cachesvc.errors import (
    BadRequestError,
    StaleEpochError,
    TokenUsedError,
    TooLargeError,
    UnprocessableError,
)
from cachesvc.response_cache import FillTarget, Payload
from cachesvc.store.answer import answer_problem
from keying import Scope, detect_kind

router = APIRouter(prefix="/v1/cache", tags=["cache"])

_STALE: dict[int | str, dict[str, Any]] = {
    409: {"description": "The token's model epoch has passed (a rollout happened)."}}


def _kind(request: dict[str, Any], kind: Any) -> str:
    if kind is not None:
        return kind  # type: ignore[no-any-return]
    detected = detect_kind(request)
    if detected not in ("chat", "completion"):
        raise BadRequestError("cannot tell whether the request is a chat or a completion",
                              field="kind", fix='set "kind": "chat" or "completion"')
    return detected


def _lookup_body(obj: Any) -> tuple[dict[str, Any], Any]:
    """Validate a lookup body by hand (this route skips pydantic for speed; the schema in the
    OpenAPI document is ``LookupRequest``'s)."""
    if not isinstance(obj, dict):
        raise UnprocessableError("the body must be an object", field="body",
                                 fix='send {"request": {...}}')
    extra = sorted(set(obj) - {"request", "kind"})
    if extra:
        raise UnprocessableError(f"unknown field {extra[0]!r}", field=extra[0],
                                 fix='send only "request" and optionally "kind"')
    request = obj.get("request")
    if not isinstance(request, dict):
        raise UnprocessableError("`request` must be the request object", field="request",
                                 fix="put the OpenAI request body under request")
    kind = obj.get("kind")
    if kind not in (None, "chat", "completion"):
        raise UnprocessableError(f"kind {kind!r} is not chat or completion", field="kind",
                                 fix='use "chat" or "completion", or leave it out')
    return request, kind


_LOOKUP_OPENAPI = {
    "security": BEARER_SECURITY,
    "requestBody": {"required": True, "content": {"application/json": {
        "schema": LookupRequest.model_json_schema()}}},
}


@router.post("/lookup", response_model=None, openapi_extra=_LOOKUP_OPENAPI,
             responses={200: {"model": LookupResponse, "description": "hit, miss or bypass"},
                        **ERROR_RESPONSES})
@lean
async def lookup(request: Request) -> Response:
    """Look a request up. A miss carries a fill token for storing the model's answer."""
    services, tenant = hot_path_caller(request)
    raw, obj = await read_json_body(request, services.settings.limits.max_request_bytes)
    body, kind = _lookup_body(obj)
    cc = parse_cache_control(request.headers.get("cache-control"))
    keyed = await services.cache.key(tenant, body, _kind(body, kind), raw=raw)
    access_log.note(request.scope, digest=keyed.key.digest)
    result = await services.cache.lookup(keyed, cc, route="cache_api")
    out: dict[str, Any] = {"status": result.status, "reason": result.reason}
    if result.status == "hit":
        assert result.payload is not None
        services.cache.notify("hit", keyed, result.raw, result.entry, result.payload)
        if not keyed.stream:
            # The same bytes as rendering ``out`` (status, reason, response, age), with the
            # answer encoded once per entry.
            return EncodedJsonResponse(
                b'{"status":"hit","reason":%b,"response":%b,"age":%d}' % (
                    orjson.dumps(result.reason), services.bodies.body(result.payload, keyed.kind),
                    result.age or 0), [])
        out["response"] = result.payload.as_body(keyed.kind)
        if keyed.stream:
            out["chunks"] = result.payload.as_chunks(keyed.kind,
                                                     include_usage=keyed.include_usage)
        out["age"] = result.age
    elif result.status == "miss" and not cc.no_store:
        out["fill_token"] = services.signer.sign(
            tenant=tenant.id, scope=keyed.scope.as_material(),
            digest=bytes(keyed.key.digest), material_digest=bytes(keyed.key.material_digest),
            model=keyed.key.model, epoch=keyed.epoch, stream=keyed.stream,
            ttl_seconds=tenant.ttl_seconds)
    return OrjsonResponse(out)


@router.post("/store", response_model=StoreResponse,
             responses={**ERROR_RESPONSES, **_STALE})
async def store(body: StoreRequest, services: ServicesDep, tenant: TenantDep) -> StoreResponse:
    """Store the model's answer under the key its fill token names."""
    grant = services.signer.verify(body.fill_token)
    if grant.tenant != tenant.id:
        raise UnprocessableError("fill_token was issued to another tenant", field="fill_token",
                                 fix="store with the token your own lookup returned")
    payload = _payload(body)
    version, epoch = await services.versions.current(grant.model)
    if epoch != grant.epoch:
        raise StaleEpochError(f"model {grant.model!r} moved from epoch {grant.epoch} to {epoch} "
                         "since the lookup", field="fill_token",
                         fix="look the request up again under the new model version")
    scope = Scope.from_material(grant.scope)
    keyed = None
    if body.request is not None:
        keyed = await services.cache.key(tenant, body.request, _kind(body.request, None))
        if bytes(keyed.key.digest) != grant.digest or keyed.scope != scope:
            raise UnprocessableError("request does not key to the fill token's entry",
                                     field="request", fix="send the request you looked up")
    ttl = grant.ttl_seconds
    if body.ttl_seconds is not None:
        if not 0 < body.ttl_seconds <= grant.ttl_seconds:
            raise UnprocessableError(
                f"ttl_seconds={body.ttl_seconds} is outside 1..{grant.ttl_seconds} (the "
                "tenant's ttl_seconds)", field="ttl_seconds",
                fix="send a shorter ttl_seconds, or leave it out for the tenant's default")
        ttl = body.ttl_seconds
    used = await services.cache.claim_fill_token(body.fill_token, grant.expires_at)
    if used is None:
        return StoreResponse(stored=False, reason="store_unavailable")
    if not used:
        raise TokenUsedError("fill_token was already used to store an answer",
                             field="fill_token",
                             fix="each lookup's token stores once; look the request up again")
    target = FillTarget(scope=scope, digest=grant.digest, material_digest=grant.material_digest,
                        model=grant.model, version=version, epoch=grant.epoch, adapter=None,
                        ttl_seconds=ttl, material=keyed.key.material if keyed else None)
    why = await services.cache.fill(target, payload, source="cache_api", keyed=keyed)
    if why == "too_large":
        raise TooLargeError(f"the entry exceeds limits.max_entry_bytes="
                            f"{services.settings.limits.max_entry_bytes}", field="response",
                            fix="do not cache this response, or raise the limit")
    if why == "unencodable":
        raise UnprocessableError("the response cannot be stored", field="response",
                                 fix="send the model's JSON body as returned")
    return StoreResponse(stored=why is None, reason=why)


def _payload(body: StoreRequest) -> Payload:
    if (body.response is None) == (body.chunks is None):
        raise UnprocessableError("send exactly one of response and chunks", field="response",
                                 fix="put the JSON body in response, or stream chunks in chunks")
    # The same check an entry makes when it is built and read back: refused here with the
    # field named, instead of stored and refused on every hit.
    problem = answer_problem(response=body.response, stream=body.chunks)
    if problem is not None:
        raise UnprocessableError(problem[1], field=problem[0],
                                 fix="store only the model's complete answer, as it returned it")
    answer_field = "response" if body.response is not None else "chunks"
    try:
        # What a hit will send: an answer orjson cannot write (an integer beyond 64 bits, or
        # nested deeper than it writes) would be a 500 on every hit.
        orjson.dumps(body.response if body.response is not None else body.chunks)
    except orjson.JSONEncodeError as exc:
        raise UnprocessableError(f"the answer cannot be sent back as JSON ({exc})",
                                 field=answer_field,
                                 fix="store the model's answer as it returned it") from None
    if body.response is not None:
        return Payload(stream=False, body=body.response)
    return Payload(stream=True, chunks=body.chunks)
