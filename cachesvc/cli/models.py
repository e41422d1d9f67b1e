"""``cachesvc models``: roll out a model version (a fresh epoch) and show the registry."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import orjson
import typer
from rich.console import Console
from rich.table import Table

from cachesvc.cli.admin_api import AdminKeyOpt, UrlOpt, admin_api
from cachesvc.cli.errors import fail
from cachesvc.cli.redis_target import open_redis_store
from invalidation import InvalidationError, RedisRegistry

app = typer.Typer(rich_markup_mode=None,
                  help="The model registry: versions and epochs.", no_args_is_help=True)

RedisOpt = Annotated[
    str | None,
    typer.Option("--redis", help="redis://host:port/db or redis+cluster://host:port."),
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="TOML config with [redis] url (or nodes).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if ts else "-"


@app.command("rollout")
def rollout(
    model: Annotated[str, typer.Argument(help="Model id, as requests name it.")],
    version: Annotated[str, typer.Argument(help="The version now serving (weights, revision).")],
    idempotent: Annotated[
        bool,
        typer.Option(help="If VERSION is already current, change nothing (no new epoch)."),
    ] = False,
    create: Annotated[
        bool,
        typer.Option(help="Allow a MODEL the registry does not know yet (refused otherwise: a "
                          "misspelt name must not start a model of its own)."),
    ] = False,
    redis: RedisOpt = None,
    config: ConfigOpt = None,
    url: UrlOpt = None,
    admin_key: AdminKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make VERSION current for MODEL with a fresh epoch: every cached entry of the model becomes
    unreachable at once, on every replica within its refresh interval. The old epochs' entries
    are then deleted (memory only: they were already unreachable), as the admin API does."""
    if url:
        out = admin_api(url, admin_key, config).call(
            "POST", f"/admin/models/{quote(model, safe='')}/rollout",
            json={"version": version, "idempotent": idempotent, "create": create})
        if as_json:
            typer.echo(orjson.dumps(out).decode())
        else:
            typer.echo(f"{model}: {out['version']} is current at epoch {out['epoch']}; the "
                       "service deletes the old epochs' entries in the background")
        return

    async def run() -> None:
        store = open_redis_store(redis, config)
        try:
            r = await RedisRegistry(store.client).rollout(
                model, version, idempotent=idempotent, only=None if create else "existing")
            deleted = (await store.delete_model(model, before_epoch=r.current.epoch)
                       if r.changed else 0)
        finally:
            await store.close()
        if as_json:
            typer.echo(orjson.dumps({
                "model": model, "version": r.current.version, "epoch": r.current.epoch,
                "changed": r.changed, "event_id": r.event_id, "old_epoch_entries_deleted": deleted,
                "previous": None if r.previous is None else
                {"version": r.previous.version, "epoch": r.previous.epoch},
            }).decode())
            return
        if not r.changed:
            typer.echo(f"{model}: {version} is already current (epoch {r.current.epoch}); "
                       "nothing changed")
            return
        prev = ("first rollout" if r.previous is None else
                f"was {r.previous.version} at epoch {r.previous.epoch}")
        typer.echo(f"{model}: {version} is current at epoch {r.current.epoch} ({prev}); "
                   f"deleted {deleted} old-epoch entries")

    try:
        asyncio.run(run())
    except InvalidationError as exc:
        fail(str(exc), code=1)


@app.command("show")
def show(redis: RedisOpt = None, config: ConfigOpt = None, url: UrlOpt = None,
         admin_key: AdminKeyOpt = None, as_json: JsonOpt = False) -> None:
    """Show every model's current version and epoch."""
    if url:
        models = admin_api(url, admin_key, config).call("GET", "/admin/models")["models"]
    else:
        async def run() -> list:  # type: ignore[type-arg]
            store = open_redis_store(redis, config)
            try:
                return await RedisRegistry(store.client).list()
            finally:
                await store.close()

        try:
            models = [{"model": m.model, "version": m.version, "epoch": m.epoch,
                       "rolled_out_at": m.rolled_out_at} for m in asyncio.run(run())]
        except InvalidationError as exc:
            fail(str(exc), code=1)
    if as_json:
        typer.echo(orjson.dumps({"models": models}).decode())
        return
    if not models:
        typer.echo("no models rolled out yet; run `cachesvc models rollout MODEL VERSION`")
        return
    table = Table("model", "version", "epoch", "rolled out")
    for m in models:
        table.add_row(m["model"], m["version"], str(m["epoch"]), _when(m.get("rolled_out_at")))
    Console().print(table)
