"""The ``cachesvc`` console script. Each command group lives in its own module here.

NOTE: a command's module is imported only when that command runs (Click's lazily loaded
subcommands), so ``cachesvc key explain`` does not pay for the auditor's scipy or the Redis
client: every command imports only what it uses. ``--help`` lists them all (and loads them).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import typer
from typer.core import TyperGroup

if TYPE_CHECKING:
    # Typer ships its own copy of Click (it does not depend on the click package); its commands
    # and contexts are that copy's classes.
    from typer._click import Command, Context

#: Command name -> (module, attribute, whether it logs): the attribute is a Typer sub-app, or
#: ``register(app)`` adding the command. ``main`` configures structlog for commands that log.
_COMMANDS: dict[str, tuple[str, str, bool]] = {
    "key": ("cachesvc.cli.key", "app", False),
    "models": ("cachesvc.cli.models", "app", True),
    "audit": ("cachesvc.cli.audit", "app", True),
    "engine": ("cachesvc.cli.engine", "app", True),
    "serve": ("cachesvc.cli.serve", "register", True),
    "purge": ("cachesvc.cli.purge", "register", True),
    "capacity": ("cachesvc.cli.capacity", "register", True),
}


def _load(name: str) -> Command:
    module, attr, _ = _COMMANDS[name]
    found: Any = getattr(importlib.import_module(module), attr)
    if isinstance(found, typer.Typer):
        found.rich_markup_mode = None
        group = typer.main.get_group(found)
        group.name = name
        return group
    holder = typer.Typer(rich_markup_mode=None)
    found(holder)
    command = typer.main.get_group(holder).get_command(typer.Context(TyperGroup()), name)
    assert command is not None, f"{module}.register added no {name!r} command"
    return command


class _LazyGroup(TyperGroup):
    def list_commands(self, ctx: Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: Context, cmd_name: str) -> Command | None:
        return _load(cmd_name) if cmd_name in _COMMANDS else None


app = typer.Typer(
    name="cachesvc",
    help="A response and prefix cache for LLM inference that can prove it is right.",
    no_args_is_help=True,
    add_completion=False,
    cls=_LazyGroup,
    # NOTE: no Rich markup: help texts name config sections such as [redis], which markup
    # would swallow as style tags (the command groups loaded later get the same setting).
    rich_markup_mode=None,
)


@app.callback()
def _root() -> None:
    """A response and prefix cache for LLM inference that can prove it is right."""


def main() -> None:
    """The console script: structlog configured (unless the command does not log), then the
    command."""
    import sys

    if _COMMANDS.get(sys.argv[1] if len(sys.argv) > 1 else "", ("", "", True))[2]:
        from cachesvc.logs import configure_logging

        configure_logging()
    app()
