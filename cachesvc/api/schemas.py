"""Request and response models of the service's own endpoints, and OpenAPI fragments for the
proxy (whose bodies are OpenAI's and are parsed by the key builder, not by pydantic)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    fix: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Bad input: `error.param` names the field."},
    401: {"model": ErrorBody, "description": "Missing or unknown API key."},
    413: {"model": ErrorBody, "description": "Body or entry over a configured limit."},
    422: {"model": ErrorBody, "description": "Well-formed but cannot be honoured."},
}

# NOTE: these document the shape the service itself checks. Value rules (ranges, message
# content shapes per role, ...) belong to the key builder, which answers a 400 naming the field.
_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {"role": {"type": "string"}},
}
_OPTIONAL = {
    "temperature": {"type": ["number", "null"]},
    "seed": {"type": ["integer", "null"]},
    "max_tokens": {"type": ["integer", "null"]},
    "stream": {"type": ["boolean", "null"]},
    "stream_options": {"type": ["object", "null"]},
    "user": {"type": ["string", "null"]},
}
_CHAT = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "messages": {"type": "array", "items": _MESSAGE},
        **_OPTIONAL,
    },
    "additionalProperties": True,
}
_COMPLETION = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "prompt": {"type": ["string", "array"]},
        **_OPTIONAL,
    },
    "additionalProperties": True,
}
_RESPONSE = {"type": "object", "description": "The OpenAI response body (or an SSE stream "
             "when `stream` is true).", "additionalProperties": True}
_HEADERS = {
    "X-Cache": {"description": "HIT, MISS or BYPASS.", "schema": {"type": "string"}},
    "X-Cache-Reason": {"description": "Why it was a miss or a bypass.",
                       "schema": {"type": "string"}},
    "Age": {"description": "Seconds since the entry was stored (hits only).",
            "schema": {"type": "integer"}},
}


#: OpenAPI security of the routes that take a tenant key (their dependency is not declared).
BEARER_SECURITY: list[dict[str, list[str]]] = [{"HTTPBearer": []}]


def proxy_openapi(kind: str) -> dict[str, Any]:
    schema = _CHAT if kind == "chat" else _COMPLETION
    return {
        "security": BEARER_SECURITY,
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        "parameters": [{"name": "Cache-Control", "in": "header", "required": False,
                        "schema": {"type": "string"},
                        "description": "no-cache, no-store, max-age=N, only-if-cached."}],
        "responses": {
            "200": {"description": "The answer; `X-Cache` says where it came from.",
                    "headers": _HEADERS,
                    "content": {"application/json": {"schema": _RESPONSE},
                                "text/event-stream": {"schema": {"description": (
                                    "SSE: `data: <chunk JSON>` events, then `data: [DONE]`.")}}}},
            "502": {"description": "The upstream failed (its error passes through).",
                    "content": {"application/json": {"schema": {"type": "object"}}}},
            "504": {"description": "only-if-cached and not cached, or upstream timeout.",
                    "content": {"application/json": {"schema": {"type": "object"}}}},
        },
    }


class LookupRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request: dict[str, Any] = Field(description="The OpenAI-style request body, as sent to the "
                                    "model (chat or completion).")
    kind: Literal["chat", "completion"] | None = Field(
        default=None, description="Guessed from the request (messages: chat; prompt: completion).")


class LookupResponse(BaseModel):
    status: Literal["hit", "miss", "bypass"]
    reason: str
    response: dict[str, Any] | None = Field(default=None,
                                            description="The cached body (hits).")
    chunks: list[dict[str, Any]] | None = Field(
        default=None, description="The cached stream chunks (hits for `stream: true`).")
    age: int | None = None
    fill_token: str | None = Field(default=None, description="Pass to /v1/cache/store (misses).")


class StoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fill_token: str = Field(min_length=1, max_length=4096)
    response: dict[str, Any] | None = Field(default=None, description="The model's JSON body.")
    chunks: list[dict[str, Any]] | None = Field(
        default=None, description="Or the model's stream chunks, in order, ending with the "
        "finish_reason chunk.")
    request: dict[str, Any] | None = Field(
        default=None, description="Optional: the request again; if given it must key to the "
        "token's entry, and the fill is reported to the auditor.")
    ttl_seconds: int | None = Field(
        default=None, description="Keep the entry this long; at most the tenant's ttl_seconds "
        "(the default).")


class StoreResponse(BaseModel):
    stored: bool
    reason: str | None = None


class RolloutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(min_length=1, max_length=200)
    #: The same version again keeps its epoch (and its entries) instead of a fresh one.
    idempotent: bool = Field(default=False, strict=True)
    # NOTE: strict like ``idempotent``: a lax bool would take "yes" or 1 for a flag that lets
    # a name start a new model (and schemathesis' negative cases expect the refusal).
    create: bool = Field(default=False, strict=True,
                         description="Allow a model the registry does not know yet (otherwise "
                                     "404: a misspelt name must not start a model).")


class ModelVersion(BaseModel):
    model: str
    version: str
    epoch: int


class ModelList(BaseModel):
    models: list[ModelVersion]


class PurgeResult(BaseModel):
    tenant: str
    deleted: int


class ModelPurgeQuery(BaseModel):
    """Which of a model's entries ``DELETE /admin/models/{model}/entries`` deletes."""

    model_config = ConfigDict(extra="forbid")

    #: Only entries of epochs below this one.
    before_epoch: int | None = Field(default=None, ge=0, strict=True)
    #: Only entries of epochs below the model's current one (what a rollout reclaims).
    old_epochs: bool = False


class ScanQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Keys per store round trip.
    batch: int = Field(default=500, ge=1, le=10_000)


class ModelPurgeResult(BaseModel):
    model: str
    before_epoch: int | None
    deleted: int


class ScanSummary(BaseModel):
    """What ``POST /admin/scan`` saw: the same counts ``cachesvc audit scan`` prints and saves."""

    run_id: str
    target: str
    entries: int
    findings: int
    findings_by_kind: dict[str, int]
    unreadable: int
    reclaimable: int
    material_checked: int


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    #: /readyz only. ``available``: store calls go through; ``unavailable``: the circuit
    #: breaker is open (store calls are skipped, requests are served as misses from the
    #: upstream); ``probing``: one trial call is checking whether the store is back.
    store: Literal["available", "unavailable", "probing"] | None = None
    #: /readyz only: the circuit breaker's own state (closed, open, half_open).
    breaker: str | None = None
    detail: dict[str, Any] = Field(default_factory=dict)
