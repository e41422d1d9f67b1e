"""``cachesvc serve``: run the cache service."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        config: str | None = typer.Option(None, help="TOML config file (or env CACHESVC_CONFIG)."),
        host: str = typer.Option("127.0.0.1", help="Interface to bind."),
        port: int = typer.Option(8080, help="Port to bind."),
    ) -> None:
        """Run the cache service (HTTP API and read-through proxy)."""
        typer.echo(
            "cachesvc: the HTTP service arrives in a later step (issue: the cache service). "
            "Today `cachesvc key explain` is available."
        )
