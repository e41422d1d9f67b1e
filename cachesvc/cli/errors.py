"""How every ``cachesvc`` command fails: one line on stderr naming the problem and the fix."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, NoReturn

import typer

if TYPE_CHECKING:  # pragma: no cover - loaded by the commands that need it
    from cachesvc.settings import Settings


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: <message>`` to stderr and exit with ``code`` (2: the caller's mistake)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def load_settings_or_fail(config: str | os.PathLike[str] | None) -> Settings:
    """The service's settings (``--config F`` or ``$CACHESVC_CONFIG``, and the environment);
    a bad config fails the command with its message (exit 2)."""
    from cachesvc.settings import ConfigError, load_settings

    try:
        return load_settings(config)
    except ConfigError as exc:
        fail(str(exc))
