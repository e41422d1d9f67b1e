"""``--url``: CLI commands that work through a running service's admin API.

The embedded store (``make serve``'s default) lives inside the service process, so the CLI
cannot open it; with ``--url`` the commands ask the service instead, with the admin key
(``--admin-key``, ``$CACHESVC_ADMIN_KEY``, or ``[admin] api_key`` from the config). Every
failure is one line: what was asked, what the service said, what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cachesvc.cli.errors import fail

UrlOpt = Annotated[str | None, typer.Option(
    "--url", envvar="CACHESVC_URL",
    help="Base URL of a running service (http://127.0.0.1:8080): work through its admin API. "
         "Needed for the embedded store, which lives inside the service.")]
AdminKeyOpt = Annotated[str | None, typer.Option(
    "--admin-key", envvar="CACHESVC_ADMIN_KEY",
    help="The service's admin key (default: [admin] api_key from --config).")]


class AdminApi:
    """One call to ``/admin/*`` (the client closes after it): the JSON answer, or an exit
    with one line."""

    def __init__(self, url: str, key: str, *, timeout: float = 600.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        self._client = httpx.Client(base_url=self.url, timeout=timeout,
                                    headers={"Authorization": f"Bearer {key}"})

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            resp = self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            fail(f"{self.url}{path}: {type(exc).__name__}: {exc or 'no answer'}; is the service "
                 "running at --url?", code=1)
        finally:
            self._client.close()
        if resp.status_code >= 400:
            fail(f"{method} {self.url}{path} answered {resp.status_code}: {_message(resp)}",
                 code=1)
        return resp.json()


def _message(resp: Any) -> str:
    """The service's error message and fix, or the start of the body."""
    try:
        err = resp.json()["error"]
        return str(err["message"]) + (f" ({err['fix']})" if err.get("fix") else "")
    except Exception:  # noqa: BLE001 - not our error shape: show what came
        return str(resp.text[:200].replace("\n", " ") or resp.reason_phrase)


def admin_api(url: str, admin_key: str | None, config: Path | str | None) -> AdminApi:
    """The client for ``--url``, with the key from ``--admin-key`` or the config."""
    key = admin_key
    if key is None:
        from cachesvc.settings import ConfigError, load_settings

        try:
            key = load_settings(config).admin.api_key
        except ConfigError as exc:
            fail(str(exc))
    if not key:
        fail("--url needs the service's admin key: pass --admin-key, set CACHESVC_ADMIN_KEY, or "
             "give --config with [admin] api_key (make serve prints the key it generated)")
    return AdminApi(url, key)
