"""``cachesvc serve``: run the cache service under uvicorn (uvloop, httptools)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Annotated

import orjson
import typer

from cachesvc.cli.errors import fail, load_settings_or_fail
from cachesvc.settings import CONFIG_ENV, Settings, load_settings, with_demo_tenant

#: Set by the parent for ``--workers N``: the settings each worker builds (demo keys included).
_SETTINGS_ENV = "CACHESVC_SERVE_SETTINGS_JSON"


def app_factory():  # type: ignore[no-untyped-def]
    """uvicorn ``--factory`` entry for worker processes: settings come from the parent."""
    from cachesvc.app import create_app
    from cachesvc.logs import configure_logging

    raw = os.environ.get(_SETTINGS_ENV)
    settings = Settings.model_validate(orjson.loads(raw)) if raw else load_settings()
    configure_logging(settings.logging.level, json=settings.logging.json_logs)
    return create_app(settings)


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        config: Annotated[str | None, typer.Option(
            help=f"TOML config file (or env {CONFIG_ENV}). None: a demo tenant, the embedded "
                 "store and the in-process engine.")] = None,
        host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(min=0, max=65535, help="Port to bind.")] = 8080,
        workers: Annotated[int, typer.Option(
            min=1, help="Worker processes; more than 1 needs [redis] (a shared store).")] = 1,
    ) -> None:
        """Run the cache service: the OpenAI-compatible proxy, the cache API and admin."""
        settings = load_settings_or_fail(config)
        if workers > 1 and not settings.redis.store_url:
            fail("--workers > 1 needs a shared store: set [redis] url (or nodes). With the "
                 "embedded store each worker would keep its own entries and its own model "
                 "registry, so a rollout on one worker would not reach the others.")
        settings, demo_key = with_demo_tenant(settings)
        admin_key = None
        if demo_key is not None and not settings.admin.api_key:
            from cachesvc.state import state_value

            admin_key = state_value(Path(settings.state_dir) / "admin-key",
                                    lambda: "sk-admin-" + secrets.token_urlsafe(24))
            settings = settings.model_copy(
                update={"admin": settings.admin.model_copy(update={"api_key": admin_key})})
        if workers > 1 and not settings.cache.secret:
            # Every worker must sign and verify with one secret; state_dir/secret provides it.
            from cachesvc.app import service_secret

            service_secret(settings)
        base = f"http://{host}:{port}"
        hint = None
        if demo_key is not None:
            typer.echo(f"cachesvc: no tenants configured; demo tenant 'demo' key: {demo_key} "
                       f"(kept in {settings.state_dir}/demo-key)")
            if admin_key:
                typer.echo(f"cachesvc: admin key: {admin_key} "
                           f"(kept in {settings.state_dir}/admin-key)")
            model = settings.upstream.model if not settings.upstream.url else "<model>"
            hint = (
                f"try:  curl -s {base}/v1/chat/completions -H 'Authorization: Bearer {demo_key}'"
                f" -H 'Content-Type: application/json' -d '{{\"model\": \"{model}\", "
                f"\"messages\": [{{\"role\": \"user\", \"content\": \"Hi\"}}], "
                f"\"temperature\": 0, \"max_tokens\": 16}}' -i")
            if settings.upstream.url is None:
                typer.echo(f"cachesvc: loading the {settings.upstream.model} model ...")
        import uvicorn

        from cachesvc.logs import configure_logging

        configure_logging(settings.logging.level, json=settings.logging.json_logs)
        from cachesvc.http_protocol import http_protocol

        common = dict(host=host, port=port, loop="uvloop",
                      http=http_protocol(header_timeout_s=settings.limits.header_timeout_s,
                                    body_timeout_s=settings.limits.body_timeout_s),
                      log_level=settings.logging.level.lower(), access_log=False,
                      timeout_graceful_shutdown=10)
        if workers == 1:
            from cachesvc.app import create_app

            on_ready = (lambda: typer.echo(hint)) if hint else None
            uvicorn.run(create_app(settings, on_ready=on_ready), **common)
            return
        if hint:
            typer.echo(hint)
        os.environ[_SETTINGS_ENV] = settings.model_dump_json(by_alias=True)
        uvicorn.run("cachesvc.cli.serve:app_factory", factory=True, workers=workers, **common)
