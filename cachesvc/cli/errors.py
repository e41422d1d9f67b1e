"""How every ``cachesvc`` command fails: one line on stderr naming the problem and the fix."""

from __future__ import annotations

from typing import NoReturn

import typer


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: <message>`` to stderr and exit with ``code`` (2: the caller's mistake)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)
