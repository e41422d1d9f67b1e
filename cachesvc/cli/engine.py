"""``cachesvc engine serve``: run the reference engine as an OpenAI-compatible upstream."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(help="The reference engine (SmolLM2 or a tiny random model) over HTTP.",
                  no_args_is_help=True, rich_markup_mode=None)


def _parse_keys(pairs: list[str]) -> dict[str, str]:
    keys: dict[str, str] = {}
    for pair in pairs:
        key, sep, tenant = pair.partition("=")
        if not sep or not key or not tenant:
            raise typer.BadParameter(f"{pair!r}: use KEY=TENANT", param_hint="--api-key")
        keys[key] = tenant
    return keys


@app.command("serve")
def serve(
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    model: Annotated[str, typer.Option(help="random-tiny or smollm2.")] = "smollm2",
    device: Annotated[str, typer.Option(help="cpu, cuda, or auto.")] = "auto",
    pool_mb: Annotated[int, typer.Option("--pool-mb", help="KV pool budget in MiB.")] = 256,
    block_size: Annotated[int, typer.Option(help="Tokens per KV block.")] = 16,
    max_running: Annotated[int, typer.Option(help="Requests in flight at once.")] = 8,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for room.")] = 64,
    max_batch_tokens: Annotated[int,
                                typer.Option(help="Tokens per scheduler step (decodes, then "
                                                  "prefill "
                                                  "chunks).")] = 512,
    high_watermark: Annotated[float,
                              typer.Option(help="Admission stops at this share of the "
                                                "pool.")] = 0.8,
    queue_timeout_s: Annotated[float,
                               typer.Option(help="Longest wait for admission before a "
                                                 "503.")] = 30.0,
    max_tokens_limit: Annotated[int, typer.Option(help="Per-request cap on max_tokens.")] = 4096,
    kv_dtype: Annotated[str, typer.Option(help="KV pool storage: full or int8.")] = "full",
    drift_sample_rate: Annotated[float,
                                 typer.Option(help="INT8: share of finished requests re-run in "
                                                   "full "
                                                     "precision in the background to watch drift "
                                                     "(docs/int8.md).")] = 0.0,
    model_epoch: Annotated[int, typer.Option(help="Model epoch in the block hashes.")] = 1,
    api_key: Annotated[list[str] | None,
                       typer.Option("--api-key", help="KEY=TENANT; repeat.")] = None,
    no_isolate_tenants: Annotated[bool, typer.Option(
        "--no-isolate-tenants",
        help="Let tenants share prefix blocks (timing-audit demo only).")] = False,
) -> None:
    """Serve /v1/chat/completions and /v1/completions from the reference engine."""
    import uvicorn

    from cachesvc.engine_app import create_engine_app
    from gpu_prefix.drift_sampler import DriftSamplerConfig
    from gpu_prefix.engine import Engine
    from gpu_prefix.errors import PrefixCacheError

    keys = _parse_keys(api_key or [])
    try:
        engine = Engine.from_name(model, device=device, pool_bytes=pool_mb * 2**20,
                                  block_size=block_size,
                                  max_running=max_running, max_queue=max_queue,
                                  model_epoch=model_epoch,
                                  isolate_tenants=not no_isolate_tenants,
                                  max_batch_tokens=max_batch_tokens,
                                  high_watermark=high_watermark, queue_timeout_s=queue_timeout_s,
                                  max_tokens_limit=max_tokens_limit, kv_dtype=kv_dtype,
                                  drift_sampling=DriftSamplerConfig(rate=drift_sample_rate))
    except (PrefixCacheError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
    fastapi_app = create_engine_app(engine, api_keys=keys or None)
    typer.echo(f"engine: {model} on {engine.device}, pool {engine.pool.num_blocks} blocks "
               f"({engine.pool.capacity_bytes / 2**20:.1f} MiB), http://{host}:{port}", err=True)
    # The model and torch are loaded: freeze them out of the collector's full passes
    # (cachesvc/heap.py), which would otherwise hold the GIL for a walk of millions of objects.
    from cachesvc import heap

    heap.freeze()
    uvicorn.run(fastapi_app, host=host, port=port, log_level="warning")
