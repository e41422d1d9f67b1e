"""``cachesvc capacity``: the seed's KV arithmetic as a command. How many bytes of K/V a token
costs, how many blocks a device (or a pool budget) holds, and how many concurrent sessions of N
tokens fit, in all and under the admission watermark. The engine sizes its pool with the same
function (``gpu_prefix.capacity.pool_plan``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from gpu_prefix.capacity import (
    DTYPE_BYTES,
    KNOWN_MODELS,
    block_bytes_for,
    device_plan,
    parse_bytes,
    pool_plan,
)
from gpu_prefix.errors import InvalidParamsError


def _geometry(model: str | None, config: Path | None) -> tuple[int, int, int, float | None]:
    """(layers, kv heads, head dim, parameters or None) from a named model or a config.json."""
    if config is not None:
        try:
            raw = json.loads(config.read_text())
        except (OSError, ValueError) as exc:
            raise typer.BadParameter(f"cannot read {config}: {exc}",
                                     param_hint="--config") from None
        text = raw.get("text_config", raw)
        try:
            heads = int(text["num_attention_heads"])
            head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
            return int(text["num_hidden_layers"]), int(
                text.get("num_key_value_heads") or heads), head_dim, None
        except (KeyError, TypeError, ValueError) as exc:
            raise typer.BadParameter(f"{config} lacks {exc}; give a transformers config.json",
                                     param_hint="--config") from None
    if model is None:
        raise typer.BadParameter("give --model NAME or --config config.json", param_hint="--model")
    if model not in KNOWN_MODELS:
        raise typer.BadParameter(f"unknown model {model!r}; use one of {', '.join(KNOWN_MODELS)} "
                                 "or --config",
                                 param_hint="--model")
    return KNOWN_MODELS[model]


def register(app: typer.Typer) -> None:
    @app.command("capacity")
    def capacity(
        model: Annotated[str | None,
                         typer.Option(help=f"A known model: {', '.join(KNOWN_MODELS)}.")] = None,
        config: Annotated[Path | None,
                          typer.Option(help="A transformers config.json instead of "
                                            "--model.")] = None,
        kv_dtype: Annotated[str,
                            typer.Option(help="KV element type: "
                                              f"{', '.join(DTYPE_BYTES)}.")] = "float16",
        scale_dtype: Annotated[str, typer.Option(
            help="INT8 only: the dtype of its scales, the model's (float16, bfloat16 or "
                 "float32).")] = "float16",
        device_memory: Annotated[str | None, typer.Option(
            help="Device memory, e.g. 24GiB (GB = 10^9 bytes, GiB = 2^30).")] = None,
        weights: Annotated[str | None, typer.Option(
            help="Bytes the weights take, e.g. 14GiB (default: parameters x 2 bytes for a known "
                 "model).")] = None,
        reserve: Annotated[str,
                           typer.Option(help="Device memory kept for activations, e.g. "
                                             "1GiB.")] = "0",
        pool: Annotated[str | None, typer.Option(
            help="A KV pool budget instead of --device-memory (what the engine's pool_mb sets), "
                 "e.g. 256MiB.")] = None,
        block_size: Annotated[int, typer.Option(help="Tokens per KV block.")] = 16,
        watermark: Annotated[float,
                             typer.Option(help="Admission high watermark, a fraction of the "
                                               "pool.")] = 0.8,
        session_tokens: Annotated[list[int] | None, typer.Option(
            "--session-tokens",
            help="Tokens per session (prompt + answer); repeat for several.")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
    ) -> None:
        """Print KV bytes per token, the pool's blocks, and the sessions that fit."""
        layers, kv_heads, head_dim, params = _geometry(model, config)
        if kv_dtype not in DTYPE_BYTES:
            raise typer.BadParameter(f"{kv_dtype!r}: use one of {', '.join(DTYPE_BYTES)}",
                                     param_hint="--kv-dtype")
        if scale_dtype not in DTYPE_BYTES or scale_dtype == "int8":
            raise typer.BadParameter(f"{scale_dtype!r}: use float16, bfloat16 or float32",
                                     param_hint="--scale-dtype")
        dtype_bytes = DTYPE_BYTES[kv_dtype]
        try:
            # NOTE: the same block arithmetic the engine's pool applies (INT8 scales included).
            block_bytes = block_bytes_for(layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                                          block_size=block_size, kv_dtype=kv_dtype,
                                          scale_bytes=DTYPE_BYTES[scale_dtype])
            if pool is not None:
                plan = pool_plan(block_bytes=block_bytes,
                                 pool_bytes=parse_bytes(pool, field="--pool"),
                                 block_size=block_size, high_watermark=watermark)
                weights_bytes = None
            else:
                if device_memory is None:
                    raise InvalidParamsError("--device-memory", "missing",
                                             "give --device-memory or --pool")
                if weights is None and params is None:
                    raise InvalidParamsError("--weights", "unknown for a --config model",
                                             "give --weights")
                weights_bytes = (parse_bytes(weights, field="--weights") if weights is not None
                                 else int((params or 0) * 2))
                plan = device_plan(layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                                   dtype_bytes=dtype_bytes,
                                   device_bytes=parse_bytes(device_memory, field="--device-memory"),
                                   weights_bytes=weights_bytes, block_size=block_size,
                                   high_watermark=watermark,
                                   reserve_bytes=parse_bytes(reserve, field="--reserve"),
                                   block_bytes=block_bytes)
        except InvalidParamsError as exc:
            raise typer.BadParameter(str(exc)) from None
        sessions = {str(n): dict(zip(("fit", "fit_under_watermark"), plan.sessions(n), strict=True))
                    for n in (session_tokens or [1000])}
        out = {"model": model or str(config), "layers": layers, "kv_heads": kv_heads,
               "head_dim": head_dim,
               "kv_dtype": kv_dtype, "weights_bytes": weights_bytes, **plan.as_log(),
               "sessions": sessions}
        if as_json:
            typer.echo(json.dumps(out))
            return
        mib = 2**20
        scales = (f" + {scale_dtype} scales (K per block and channel, V per "
                  "token)" if kv_dtype == "int8" else "")
        typer.echo(f"{out['model']}: {layers} layers x 2 (K, V) x {kv_heads} KV heads x {head_dim} "
                   "dims x "
                   f"{dtype_bytes} bytes{scales} = {plan.kv_bytes_per_token / mib:.4g} MiB of KV "
                   "per token")
        typer.echo(f"pool: {plan.pool_bytes / 2**30:.3g} GiB = {plan.num_blocks} blocks of "
                   f"{block_size} tokens "
                   f"= {plan.pool_tokens} tokens; admission stops at {watermark:.0%}: "
                   f"{plan.admit_tokens} tokens")
        for n, fit in sessions.items():
            typer.echo(f"sessions of {n} tokens: {fit['fit']} fit ({fit['fit_under_watermark']} "
                       "under the watermark)")
