"""The service's configuration: a TOML file, overridden by ``CACHESVC_*`` environment variables.

Precedence, highest first: values passed to :func:`load_settings` in code, environment variables
(``CACHESVC_REDIS__URL``, ``CACHESVC_ADMIN__API_KEY``, ... with ``__`` between levels), the TOML
file (``--config`` or ``CACHESVC_CONFIG``), then the defaults below. ``examples/cachesvc.toml``
documents every field with a comment.

With no file at all the service runs standalone: one demo tenant (its key is generated and
printed at start-up), the embedded store, and the in-process reference engine as upstream.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_ENV = "CACHESVC_CONFIG"
DEMO_TENANT = "demo"


class _Section(BaseModel):
    # NOTE: unknown keys are errors, so a misspelt setting fails at start-up instead of being
    # silently ignored (a typo in `cache_nondeterministic` must not change what is cached).
    model_config = ConfigDict(extra="forbid", frozen=True)


#: The in-process engine's models (gpu_prefix.models.MODEL_NAMES; not imported here, since that
#: loads torch, and a test keeps the two equal).
ENGINE_MODELS = ("smollm2", "random-tiny")


class UpstreamSettings(_Section):
    """Where misses go. No ``url``: the reference engine runs in this process."""

    url: str | None = None
    api_key: str | None = Field(default=None, description="Bearer key sent to the upstream.")
    model: str = Field(
        default="smollm2",
        description='In-process engine model: "smollm2" (SmolLM2-135M-Instruct) or "random-tiny".',
    )
    device: str = Field(default="auto",
                        description='In-process engine device: "auto", "cpu", "cuda".')
    timeout_s: float = Field(default=120.0, gt=0)
    #: Model version reported to the registry for the in-process engine at start-up.
    version: str = "1"

    @field_validator("model")
    @classmethod
    def _engine_model_known(cls, model: str, info: Any) -> str:
        if info.data.get("url") is None and model not in ENGINE_MODELS:
            raise ValueError(
                f"{model!r} is not a model the in-process engine has; use one of "
                f"{', '.join(ENGINE_MODELS)}, or set upstream.url to an OpenAI-compatible server")
        return model


class EngineSettings(_Section):
    """The in-process reference engine's scheduler and KV pool (``[upstream]`` with no ``url``).
    The trade-offs of each are in the README's engine section."""

    #: KV pool budget, preallocated at start (``cachesvc capacity --pool`` shows what it holds).
    pool_mb: int = Field(default=512, gt=0)
    block_size: int = Field(default=16, ge=1, le=256)
    #: Requests scheduled in every step. More: higher throughput, slower steps for each.
    max_running: int = Field(default=8, ge=1)
    #: Tokens in one step (decodes first, then prefill chunks). Lower: decodes never wait long
    #: behind a long prompt; higher: long prompts reach their first token in fewer steps.
    max_batch_tokens: int = Field(default=512, ge=2)
    #: Requests that may wait for admission; past it, 503 with Retry-After.
    max_queue: int = Field(default=64, ge=0)
    queue_timeout_s: float = Field(default=30.0, gt=0)
    #: Admission stops when running requests would hold this fraction of the pool.
    high_watermark: float = Field(default=0.8, gt=0, le=1)
    #: Per-request cap on max_tokens.
    max_tokens_limit: int = Field(default=4096, ge=1)
    #: KV pool storage: "full" (the model's dtype) or "int8" (about half the bytes of fp16 K/V;
    #: `cachesvc audit drift` measures what it costs and turns it off past its thresholds).
    kv_dtype: Literal["full", "int8"] = "full"
    #: INT8 only: the share of finished requests re-run in full precision in the background to
    #: watch drift (0: off), and what that may spend (docs/int8.md, "Background sampling").
    drift_sample_rate: float = Field(default=0.0, ge=0, le=1)
    drift_sample_tokens_per_minute: int = Field(default=20_000, ge=1)
    drift_sample_queue: int = Field(default=8, ge=1)
    drift_sample_seed: int = 0
    #: INT8 only: run the drift audit (`cachesvc audit drift`'s corpus) at start and then every
    #: this many hours (0: never; it generates prompts x max_tokens greedy tokens twice).
    drift_audit_every_h: float = Field(default=0.0, ge=0)
    drift_audit_prompts: int = Field(default=2, ge=1, le=8)
    drift_audit_max_tokens: int = Field(default=1024, ge=16)


class RedisSettings(_Section):
    """The response store. No ``url`` and no ``nodes``: the embedded in-process store."""

    url: str | None = Field(
        default=None,
        description="redis://host:port/db, rediss://..., or redis+cluster://host:port for Cluster.",
    )
    nodes: list[str] = Field(
        default_factory=list, description='Cluster startup nodes, e.g. ["10.0.0.1:7000", ...].'
    )
    #: Bound on every single store call; a slower call counts as a store error (a miss).
    timeout_ms: int = Field(default=200, gt=0, le=60_000)

    @property
    def store_url(self) -> str | None:
        if self.nodes:
            return "redis+cluster://" + ",".join(self.nodes)
        return self.url


class EmbeddedStoreSettings(_Section):
    max_bytes: int = Field(default=256 * 1024 * 1024, gt=0)


class BreakerSettings(_Section):
    """Circuit breaker around the store: open after ``failures`` errors in a row."""

    failures: int = Field(default=5, ge=1)
    #: How long an open breaker waits before letting one probe call through.
    reset_after_s: float = Field(default=1.0, gt=0)


class AdminSettings(_Section):
    api_key: str | None = Field(default=None, description="Bearer key for /admin/*; none: off.")
    #: Bearer key for GET /metrics (a Prometheus scrape); the admin key works there too. With
    #: neither, /metrics is off: its labels name every tenant with its hit and miss counts.
    metrics_key: str | None = Field(default=None, min_length=16)


class TenantSettings(_Section):
    id: str = Field(min_length=1, max_length=200)
    api_keys: list[str] = Field(min_length=1)
    scope: Literal["tenant", "user"] = "tenant"
    cache_nondeterministic: bool = False
    ttl_seconds: int = Field(default=86_400, gt=0)
    canaries: list[str] = Field(default_factory=list)

    @field_validator("api_keys")
    @classmethod
    def _keys_long_enough(cls, keys: list[str]) -> list[str]:
        for k in keys:
            if len(k) < 16:
                raise ValueError("every api key must be at least 16 characters")
        return keys


class AuditSettings(_Section):
    """Read by the shadow auditor (``audit/``)."""

    enabled: bool = True
    sample_rate: float = Field(default=0.01, ge=0, le=1)
    fill_sample_rate: float = Field(default=0.01, ge=0, le=1)
    queue_size: int = Field(default=1000, ge=1)
    findings_path: str | None = Field(
        default=None, description="Findings file for the embedded store; default <state_dir>/."
    )
    oracle: Literal["engine", "upstream", "none"] = "engine"
    #: Share of one core's wall time the recompute may take (a token bucket).
    recompute_budget: float = Field(default=0.01, gt=0, le=1)
    #: Most seconds of recompute the bucket banks while idle and spends at once.
    recompute_burst_s: float = Field(default=2.0, gt=0)
    #: The worker waits this long after a sample arrives, then checks all that are queued.
    batch_wait_s: float = Field(default=0.05, ge=0, le=10)
    #: Serving an epoch replaced longer than this ago is `stale`; default: 30 s, or twice
    #: cache.registry_refresh_s when that is longer.
    stale_grace_s: float | None = Field(default=None, ge=0)


class LimitSettings(_Section):
    #: Largest request body on the proxy and lookup routes (and the keyed request).
    max_request_bytes: int = Field(default=1024 * 1024, gt=0)
    #: Largest stored entry; a store body may be up to max_request_bytes + 2 * this.
    max_entry_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    #: Largest body on every other route (admin, metrics, health).
    max_other_body_bytes: int = Field(default=64 * 1024, gt=0)
    #: A request's head (line and headers) must arrive within this many seconds of the
    #: connection opening or the previous answer; a slower connection is closed.
    header_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    #: A request's whole body must arrive within this many seconds of its head; a slower
    #: connection is closed (and an oversize body is drained for at most this long).
    body_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    #: Upper bound on any tenant's ttl_seconds; a larger one is refused at start-up.
    max_ttl_seconds: int = Field(default=30 * 86_400, gt=0)


class CacheSettings(_Section):
    #: Secret (16 to 64 bytes) for entry MACs, fill tokens and the material digest; without
    #: it, one is kept in <state_dir>/secret, which is wrong for replicas on several hosts: set
    #: it (env CACHESVC_CACHE__SECRET) there.
    secret: str | None = None
    #: Secrets rotated out: entries (and fill tokens) signed under them still verify, and are
    #: served, until their TTL ends. Rotate by moving the old secret here, then drop it after
    #: limits.max_ttl_seconds.
    previous_secrets: list[str] = Field(default_factory=list)
    fill_token_ttl_s: float = Field(default=300.0, gt=0)
    #: How long concurrent identical misses wait for the one fill before calling upstream too.
    single_flight_wait_s: float = Field(default=120.0, gt=0)
    #: Re-read the model registry at least this often (bound on a lost rollout event).
    registry_refresh_s: float = Field(default=2.0, gt=0)
    #: Check the entry's epoch against a fresh registry read on every hit.
    strict_epoch: bool = False
    #: Keep each entry's key material (the request's keyed fields, prompt included) inside it,
    #: so `cachesvc audit scan` can recompute its digests and its answer. Costs the request's
    #: canonical size per entry; off: the scan checks digests only on live hits.
    store_material: bool = True


class LoggingSettings(_Section):
    level: str = "INFO"
    json_logs: bool | None = Field(default=None, alias="json")
    #: Put prompt and response text into logs. Off: logs carry digests, scopes and sizes only.
    log_content: bool = False
    #: One structured line per request (cachesvc/access_log.py); never prompt or answer text.
    access_log: bool = True
    #: Most access-log lines per second for successful requests (a token bucket); every 4xx
    #: and 5xx is logged regardless.
    access_log_max_per_s: float = Field(default=100.0, gt=0)


class Settings(BaseSettings):
    """The whole configuration. See ``examples/cachesvc.toml``."""

    model_config = SettingsConfigDict(
        env_prefix="CACHESVC_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    state_dir: str = Field(default_factory=lambda: str(Path.home() / ".local/state/cachesvc"))
    upstream: UpstreamSettings = UpstreamSettings()
    engine: EngineSettings = EngineSettings()
    redis: RedisSettings = RedisSettings()
    embedded: EmbeddedStoreSettings = EmbeddedStoreSettings()
    breaker: BreakerSettings = BreakerSettings()
    admin: AdminSettings = AdminSettings()
    tenants: list[TenantSettings] = Field(default_factory=list)
    audit: AuditSettings = AuditSettings()
    limits: LimitSettings = LimitSettings()
    cache: CacheSettings = CacheSettings()
    logging: LoggingSettings = LoggingSettings()

    @field_validator("state_dir")
    @classmethod
    def _expand(cls, v: str) -> str:
        return str(Path(v).expanduser())

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        from cachesvc.store.errors import StoreConfigError
        from cachesvc.store.mac import check_secret

        for name, value in [("cache.secret", self.cache.secret),
                            *(("cache.previous_secrets", s) for s in self.cache.previous_secrets)]:
            if value is None:
                continue
            try:
                check_secret(value.encode())
            except StoreConfigError as exc:
                raise ValueError(str(exc).replace("cache.secret", name, 1)) from None
        if self.cache.previous_secrets and not self.cache.secret:
            raise ValueError("cache.previous_secrets: needs cache.secret (the current secret "
                             "that replaces them)")
        seen_ids: set[str] = set()
        seen_keys: set[str] = set()
        for t in self.tenants:
            if t.id in seen_ids:
                raise ValueError(f"tenants: id {t.id!r} appears twice; give each tenant one entry")
            seen_ids.add(t.id)
            for k in t.api_keys:
                if k in seen_keys or k in (self.admin.api_key, self.admin.metrics_key):
                    raise ValueError(
                        f"tenants[{t.id}].api_keys: a key is shared with another tenant or the "
                        "admin; every key must identify exactly one caller"
                    )
                seen_keys.add(k)
            if t.ttl_seconds > self.limits.max_ttl_seconds:
                raise ValueError(
                    f"tenants[{t.id}].ttl_seconds={t.ttl_seconds} exceeds "
                    f"limits.max_ttl_seconds={self.limits.max_ttl_seconds}; lower it or raise "
                    "the limit"
                )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _CONFIG_PATH.get("path")
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


# The TOML path for the settings being built now; pydantic-settings reads sources from a
# classmethod, so the path travels through here rather than as an argument.
_CONFIG_PATH: dict[str, Path | None] = {"path": None}


class ConfigError(ValueError):
    """Raised when the config file is missing, unreadable or invalid; the message says where."""


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Build settings from ``path`` (or ``$CACHESVC_CONFIG``), the environment and ``overrides``."""
    from pydantic import ValidationError

    chosen = path if path is not None else os.environ.get(CONFIG_ENV) or None
    p = Path(chosen) if chosen is not None else None
    if p is not None and not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass --config with a TOML file")
    _CONFIG_PATH["path"] = p
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, p)) from None
    except Exception as exc:  # noqa: BLE001 - TOML syntax errors surface here
        raise ConfigError(f"config file {str(p)!r}: {exc}") from None
    finally:
        _CONFIG_PATH["path"] = None


def with_demo_tenant(settings: Settings) -> tuple[Settings, str | None]:
    """Add the demo tenant when none is configured; return it with its key (or None). The key
    is kept in ``<state_dir>/demo-key``, so it survives a restart."""
    if settings.tenants:
        return settings, None
    from cachesvc.state import state_value

    key = state_value(Path(settings.state_dir) / "demo-key",
                      lambda: "sk-demo-" + secrets.token_urlsafe(24))
    demo = TenantSettings(id=DEMO_TENANT, api_keys=[key])
    return settings.model_copy(update={"tenants": [demo]}), key


def _describe(exc: Any, path: Path | None) -> str:
    where = f"config {str(path)!r}" if path else "settings"
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        parts.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
    return f"{where}: " + "; ".join(parts)
