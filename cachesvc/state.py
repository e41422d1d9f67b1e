"""Values the service keeps in its ``state_dir``: the fill-token secret, and the demo tenant's
and admin's generated keys (so they survive a restart)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path


def state_value(path: Path, make: Callable[[], str], *, min_len: int = 32) -> str:
    """The value kept in ``path`` (owner-only), made once with ``make()`` when the file is
    missing or shorter than ``min_len``. Several processes starting at once agree: the first
    writer wins and the others read what it wrote."""
    with contextlib.suppress(FileNotFoundError):
        data = path.read_text().strip()
        if len(data) >= min_len:
            return data
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(make())
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip()
