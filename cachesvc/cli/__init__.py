"""The ``cachesvc`` console script. Each command group lives in its own module here."""

from __future__ import annotations

import typer

from cachesvc.cli import audit as _audit
from cachesvc.cli import capacity as _capacity
from cachesvc.cli import engine as _engine
from cachesvc.cli import key as _key
from cachesvc.cli import models as _models
from cachesvc.cli import purge as _purge
from cachesvc.cli import serve as _serve

app = typer.Typer(
    name="cachesvc",
    help="A response and prefix cache for LLM inference that can prove it is right.",
    no_args_is_help=True,
    add_completion=False,
    # NOTE: no Rich markup: help texts name config sections such as [redis], which markup
    # would swallow as style tags.
    rich_markup_mode=None,
)
app.add_typer(_key.app, name="key")
app.add_typer(_models.app, name="models")
app.add_typer(_audit.app, name="audit")
app.add_typer(_engine.app, name="engine")
_serve.register(app)
_purge.register(app)
_capacity.register(app)


def main() -> None:
    from cachesvc.logs import configure_logging

    configure_logging()
    app()
