"""``cachesvc key explain``: show how a request is keyed, and why two requests did or did not
share an entry."""

from __future__ import annotations

import sys
from typing import Annotated

import orjson
import typer

from cachesvc.cli.errors import fail
from keying import InvalidRequestError, KeyParams, Scope, build_key
from keying.canonical import RequestKind

app = typer.Typer(rich_markup_mode=None,
                  help="Inspect cache keys.", no_args_is_help=True)


@app.command("explain")
def explain(
    tenant: Annotated[str | None, typer.Option(help="Tenant id (the scope's owner).")] = None,
    user: Annotated[str | None, typer.Option(help="User id, for --scope user.")] = None,
    scope: Annotated[
        str, typer.Option(help="tenant, user or public; user if --user is given.")
    ] = "",
    epoch: Annotated[int, typer.Option(min=0, help="Model epoch from the registry.")] = 0,
    adapter: Annotated[str | None, typer.Option(help="Adapter (LoRA) id.")] = None,
    kind: Annotated[
        str | None, typer.Option(help="chat, completion or generic; guessed from the body.")
    ] = None,
    allow_nondeterministic: Annotated[
        bool, typer.Option(help="Key as a tenant that opted in to caching sampled output.")
    ] = False,
) -> None:
    """Read a request (JSON) on stdin and print its key as one JSON object."""
    raw = sys.stdin.buffer.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        fail(f"stdin is not valid JSON: {exc}; pipe a request body, e.g. < request.json")
    scope_kind = scope or ("user" if user else "public" if tenant is None else "tenant")
    if kind is not None and kind not in ("chat", "completion", "generic"):
        fail(f"--kind {kind!r}: use chat, completion or generic")
    try:
        s = Scope(kind=scope_kind, tenant=tenant, user=user)  # type: ignore[arg-type]
        if scope_kind != "public" and tenant is None:
            raise InvalidRequestError("--tenant", "missing", "pass --tenant T")
        result = build_key(
            body,
            KeyParams(
                scope=s,
                epoch=epoch,
                adapter=adapter,
                kind=kind,  # type: ignore[arg-type]
                allow_nondeterministic=allow_nondeterministic,
            ),
        )
    except InvalidRequestError as exc:
        fail(f"invalid request: {exc}")
    sys.stdout.write(orjson.dumps(result.explain(), option=orjson.OPT_INDENT_2).decode() + "\n")


_: RequestKind  # keep the import for readers: the kinds accepted above
