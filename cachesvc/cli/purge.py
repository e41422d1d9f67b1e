"""``cachesvc purge``: reclaim old epochs, delete one tenant's entries, or a model's."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import orjson
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cachesvc.cli.admin_api import AdminKeyOpt, UrlOpt, admin_api
from cachesvc.cli.errors import fail
from cachesvc.cli.redis_target import open_redis_store
from cachesvc.store import StoreError
from invalidation import InvalidationError, PurgeProgress, PurgeSelector, RedisRegistry


def register(app: typer.Typer) -> None:
    @app.command("purge")
    def purge(
        model: Annotated[str | None, typer.Option(help="Purge this model's entries.")] = None,
        before_epoch: Annotated[
            int | None, typer.Option(min=0, help="Only epochs below N (needs --model).")
        ] = None,
        old_epochs: Annotated[
            bool, typer.Option(help="Only epochs below the model's current one (needs --model).")
        ] = False,
        tenant: Annotated[
            str | None, typer.Option(help="Purge every entry of this tenant (deletion request).")
        ] = None,
        redis: Annotated[
            str | None, typer.Option("--redis", help="redis://host:port/db or redis+cluster://...")
        ] = None,
        config: Annotated[
            Path | None, typer.Option("--config", help="TOML config with [redis] url.")
        ] = None,
        url: UrlOpt = None,
        admin_key: AdminKeyOpt = None,
        batch: Annotated[int, typer.Option(min=1, max=100_000, help="Keys per SCAN step.")] = 500,
        as_json: Annotated[bool,
                           typer.Option("--json", help="Print the final count as JSON.")] = False,
    ) -> None:
        """Delete entries on every node, in batches, with progress. An interrupted purge
        resumes where it stopped when run again with the same options."""
        if old_epochs and before_epoch is not None:
            fail("--old-epochs and --before-epoch N: pass one of them")
        if old_epochs and model is None:
            fail("--old-epochs needs --model M")
        if url:
            _purge_via_api(url, admin_key, config, model=model, tenant=tenant,
                           before_epoch=before_epoch, old_epochs=old_epochs, as_json=as_json)
            return

        async def run() -> dict[str, object]:
            store = open_redis_store(redis, config)
            try:
                cutoff = before_epoch
                if old_epochs:
                    assert model is not None
                    cutoff = (await RedisRegistry(store.client).current(model)).epoch
                selector = PurgeSelector(model=model, before_epoch=cutoff, tenant=tenant)
                with Progress(
                    TextColumn("[bold]purge[/] {task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("deleted {task.fields[deleted]}"),
                    TimeElapsedColumn(),
                    transient=as_json,
                    disable=as_json,
                ) as bar:
                    task = bar.add_task(selector.describe(), total=None, deleted=0)

                    def on_progress(p: PurgeProgress) -> None:
                        bar.update(task, completed=p.scanned, deleted=p.deleted,
                                   total=max(p.estimate or 0, p.scanned) or None)

                    report = await store.purger(batch=batch).run(selector, on_progress=on_progress)
                return {
                    "job_id": report.job_id, "selector": selector.describe(),
                    "deleted": report.deleted, "scanned": report.scanned, "shards": report.shards,
                    "resumed": report.resumed, "seconds": round(report.seconds, 3),
                }
            finally:
                await store.close()

        try:
            result = asyncio.run(run())
        except InvalidationError as exc:
            fail(str(exc), code=1)
        except StoreError as exc:
            fail(f"{exc}; run the same command again to resume", code=1)
        if as_json:
            typer.echo(orjson.dumps(result).decode())
        else:
            resumed = " (resumed)" if result["resumed"] else ""
            typer.echo(f"purged {result['deleted']} entries ({result['selector']}), scanned "
                       f"{result['scanned']} keys on {result['shards']} node(s){resumed}")


def _purge_via_api(url: str, admin_key: str | None, config: Path | None, *, model: str | None,
                   tenant: str | None, before_epoch: int | None, old_epochs: bool,
                   as_json: bool) -> None:
    """``purge --url``: one admin call, by tenant or by model (not both at once)."""
    if (model is None) == (tenant is None):
        fail("with --url, pass one of --model M or --tenant T")
    api = admin_api(url, admin_key, config)
    if tenant is not None:
        out = api.call("DELETE", f"/admin/tenants/{quote(tenant, safe='')}/entries")
        what = f"tenant {tenant}"
    else:
        params: dict[str, object] = {"old_epochs": "true"} if old_epochs else {}
        if before_epoch is not None:
            params["before_epoch"] = before_epoch
        out = api.call("DELETE", f"/admin/models/{quote(str(model), safe='')}/entries",
                       params=params)
        what = f"model {model}" + (f" below epoch {out['before_epoch']}"
                                   if out.get("before_epoch") is not None else "")
    if as_json:
        typer.echo(orjson.dumps(out).decode())
    else:
        typer.echo(f"purged {out['deleted']} entries ({what}) through {url}")
