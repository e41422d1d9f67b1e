"""``cachesvc audit``: the offline scan, the timing audit, the INT8 KV drift audit and reports."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import random
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from audit import (
    AuditConfigError,
    FindingsLogError,
    Journal,
    Recorder,
    TimingConfig,
    TimingProbeError,
    levels_for_keys,
    run_timing,
)
from audit.finding import new_run_id
from audit.report import REPORT_FORMATS, build_report, power_sentence, render
from audit.timing import detectable_distance, summarize, trials_for
from cachesvc.cli.admin_api import AdminKeyOpt, UrlOpt, admin_api
from cachesvc.cli.errors import fail, load_settings_or_fail

if TYPE_CHECKING:  # pragma: no cover - loaded by the commands that need it
    from audit import Oracle, ScanResult
    from cachesvc.settings import Settings

app = typer.Typer(help="Audit the cache: scan entries, measure timing leaks and INT8 KV drift, "
                       "write reports.",
                  no_args_is_help=True, rich_markup_mode=None)

ConfigOpt = Annotated[
    str | None, typer.Option("--config", help="TOML config file (or env CACHESVC_CONFIG).")
]
FindingsOpt = Annotated[
    str | None,
    typer.Option("--findings", help="Findings file (overrides [audit] findings_path; "
                                    "ignored when [redis] url is set)."),
]


def _journal(settings: Settings, findings: str | None) -> Journal:
    """``--findings FILE``, else the journal beside the configured store."""
    from cachesvc.auditing import findings_path_of, journal_for, open_journal
    from cachesvc.store import StoreConfigError

    try:
        if findings:
            return open_journal(redis_url=None, findings_path=findings)
        return journal_for(settings.redis, findings_path_of(settings))
    except (FindingsLogError, StoreConfigError) as exc:
        fail(str(exc))


@app.command("scan")
def scan(
    config: ConfigOpt = None,
    findings: FindingsOpt = None,
    batch: Annotated[int, typer.Option(min=1, help="Keys per SCAN round trip.")] = 500,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    recompute: Annotated[bool, typer.Option(
        "--recompute/--no-recompute",
        help="Also recompute each clean entry of a current epoch from the request in its key "
             "material, through the oracle (one model call per entry): finds wrong answers "
             "stored under valid keys.")] = False,
    oracle: Annotated[str | None, typer.Option(
        help="Oracle for --recompute: engine (load [upstream] model here) or upstream "
             "([upstream] url). Default: [audit] oracle.")] = None,
    url: UrlOpt = None,
    admin_key: AdminKeyOpt = None,
) -> None:
    """Walk every entry (every node of a cluster), check every invariant that needs no request
    (and, with --recompute, each answer against the current model), record the findings, and
    exit 1 when there are any. With --url the running service scans its own store (the
    embedded one included) and records the findings in its journal."""
    if url:
        if recompute:
            fail("--recompute runs the oracle in this process and needs [redis] url; through "
                 "--url the service scans without recomputing")
        out = admin_api(url, admin_key, config).call("POST", "/admin/scan",
                                                     params={"batch": batch})
        typer.echo(f"scan {out['run_id']} of {out['target']} at {url}: {out['entries']} entries, "
                   f"{out['findings']} findings{_counts(out['findings_by_kind'])}, "
                   f"{out['unreadable']} unreadable, {out['reclaimable']} reclaimable (old epochs)")
        raise typer.Exit(code=1 if out["findings"] else 0)
    settings = load_settings_or_fail(config)
    if not settings.redis.store_url:
        fail("the embedded store lives inside the service process, so this process cannot "
             "open it: pass --url http://HOST:PORT (and the admin key) to have the service "
             "scan it, or set [redis] url (or nodes)")
    the_oracle = _scan_oracle(settings, oracle) if recompute else None
    result = asyncio.run(_scan(settings, _journal(settings, findings), batch=batch, quiet=quiet,
                               oracle=the_oracle))
    typer.echo(
        f"scan {result.run_id}: {result.entries} entries, {result.findings} findings"
        f"{_counts(result.findings_by_kind)}, {result.unreadable} unreadable, "
        f"{result.reclaimable} reclaimable (old epochs)"
    )
    if result.recomputed:
        typer.echo(f"recomputed:{_counts(result.recomputed)}")
    readable = result.entries - result.unreadable
    if readable and not result.material_checked:
        typer.echo("note: no entry carries its key material ([cache] store_material = false, or "
                   "filled before it was on), so digests were not recomputed and answers not "
                   "read back (the shadow auditor checks them against live requests)", err=True)
    if result.entries >= 10 and readable == 0:
        typer.echo("warning: no entry verified: is [cache] secret the "
                   "one the service ran with?", err=True)
    raise typer.Exit(code=1 if result.findings else 0)


def _counts(counts: Any) -> str:
    """``{'canary': 1, 'stale': 2}`` as `` (canary 1, stale 2)``; nothing when empty."""
    return f" ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})" if counts else ""


def _redacted(url: str) -> str:
    """A store URL without its password, for reports."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    port = f":{parts.port}" if parts.port else ""
    netloc = f"{parts.username or ''}:***@{parts.hostname}{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _scan_oracle(settings: Settings, name: str | None) -> Oracle:
    """The oracle ``--recompute`` asks: the reference engine loaded in this process, or the
    OpenAI-compatible upstream."""
    name = name or settings.audit.oracle
    if name == "engine":
        from cachesvc.auditing import EngineOracle
        from cachesvc.wiring import load_engine

        try:
            return EngineOracle(load_engine(settings))
        except Exception as exc:  # noqa: BLE001 - an unknown model name, a missing package
            fail(f"--oracle engine: cannot load [upstream] model {settings.upstream.model!r}: "
                 f"{exc}")
    if name == "upstream":
        if not settings.upstream.url:
            fail("--oracle upstream needs [upstream] url; or use --oracle engine")
        from cachesvc.auditing import UpstreamOracle

        return UpstreamOracle(settings.upstream.url, api_key=settings.upstream.api_key)
    fail(f"--oracle: {name!r} cannot recompute; use engine or upstream")


async def _scan(settings: Settings, journal: Journal, *, batch: int, quiet: bool,
                oracle: Oracle | None = None) -> ScanResult:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cachesvc.auditing import material_secret, run_scan
    from cachesvc.cli.redis_target import open_redis_store_at
    from invalidation import RedisRegistry

    secret = material_secret(settings)
    if secret is None:
        fail("the scan verifies every entry's MAC, which needs the service secret: set "
             "[cache] secret (or run where the service's <state_dir>/secret is)")
    # The caller checked that [redis] names one; a scan is no request: admin timeouts.
    store = open_redis_store_at(settings.redis.url, list(settings.redis.nodes))
    try:
        with Progress(TextColumn("scanning"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), disable=quiet, transient=False) as progress:
            task = progress.add_task("scan", total=None)
            # The registry the service uses lives beside its Redis store.
            return await run_scan(settings, store, journal, registry=RedisRegistry(store.client),
                                  secret=secret, batch=batch, oracle=oracle,
                                  target=_redacted(settings.redis.store_url or "-"),
                                  progress=lambda n: progress.update(task, completed=n))
    finally:
        await store.close()


@app.command("timing")
def timing(
    url: Annotated[str, typer.Option(help="Base URL of an OpenAI-compatible endpoint.")],
    victim_key: Annotated[str, typer.Option(
        "--victim-key", "--key-a", help="API key of the victim (tenant A).")],
    other_tenant_key: Annotated[str | None, typer.Option(
        "--probe-key-other-tenant", "--key-b",
        help="API key of another tenant: tests the other_tenant level (a leak if shared).")] = None,
    same_tenant_key: Annotated[str | None, typer.Option(
        "--probe-key-same-tenant", "--key-a2",
        help="A second API key of the victim's tenant: tests the same_tenant level.")] = None,
    user: Annotated[str | None, typer.Option(
        help="For a per-user tenant (scope = \"user\"): the victim's `user` field.")] = None,
    other_user: Annotated[str | None, typer.Option(
        help="Another user of the victim's tenant: tests the other_user level (needs --user).")
    ] = None,
    trials: Annotated[int | None, typer.Option(
        min=5, help="Hit/miss trial pairs per level (default 250, or as --detect needs).")] = None,
    detect: Annotated[float | None, typer.Option(
        help="Size the run: the KS distance between hit and miss times to detect with 90% "
             "power (0.3 needs about 230 trials at alpha 1e-4).")] = None,
    model: Annotated[str | None,
                     typer.Option(help="Model id; default: first of /v1/models.")] = None,
    endpoint: Annotated[str, typer.Option(help="chat or completion.")] = "chat",
    prompt_words: Annotated[int, typer.Option(
        min=10, help="Words per random prompt; longer prompts show a prefix cache more.")] = 300,
    shared_fraction: Annotated[float, typer.Option(help="Prefix share of a hit probe.")] = 0.9,
    alpha: Annotated[float, typer.Option(help="Significance level of the KS test.")] = 1e-4,
    same_tenant_is_leak: Annotated[
        bool, typer.Option(help="Treat same-tenant sharing as a leak (user-scoped tenants).")
    ] = False,
    seed: Annotated[int | None, typer.Option(help="Seed for prompts and trial order.")] = None,
    config: ConfigOpt = None,
    findings: FindingsOpt = None,
    save: Annotated[bool, typer.Option(help="Store the result and findings for reports.")] = True,
) -> None:
    """Measure whether one caller can tell, by timing, that another caller's prompt is cached
    (interleaved hit/miss trials, one-sided KS test). Progress and an estimate of the time left
    go to stderr; the results so far are saved every 10 s, so a run stopped early still leaves
    them (marked interrupted). Exit 1 on a leak."""
    from cachesvc.auditing import HttpProber, discover_model

    try:
        n = trials or (trials_for(detect, alpha) if detect is not None else 250)
        cfg = TimingConfig(trials=n, prompt_words=prompt_words,
                           shared_fraction=shared_fraction, alpha=alpha)
        levels = levels_for_keys(key_a=victim_key, key_b=other_tenant_key,
                                 key_a2=same_tenant_key, same_tenant_is_leak=same_tenant_is_leak,
                                 user=user, other_user=other_user)
        chosen = model or discover_model(url, key=victim_key)
        prober = HttpProber(url, model=chosen, endpoint=endpoint)
    except (AuditConfigError, TimingProbeError, ValueError) as exc:
        fail(str(exc))
    typer.echo(f"timing: {n} trials per level at {', '.join(lv.name for lv in levels)}; "
               f"{power_sentence(detectable_distance(n, alpha))}", err=True)
    journal = _journal(load_settings_or_fail(config), findings) if save else None
    run_id = new_run_id()
    latest: list[Any] = []

    def checkpoint(partial: Any) -> None:
        latest[:] = [partial]
        if journal is not None:
            journal.save_result("timing", partial.as_dict())

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    # A time limit (`timeout`, a scheduler) stops with SIGTERM: treat it as Ctrl-C, so the
    # results so far are saved as interrupted.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with Progress(TextColumn("timing trials"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                      transient=True) as progress:
            task = progress.add_task("timing trials", total=n * len(levels))
            result = run_timing(levels, prober, target=url, config=cfg,
                                rng=random.Random(seed), run_id=run_id, checkpoint=checkpoint,
                                progress=lambda d, t: progress.update(task, completed=d))
    except (TimingProbeError, KeyboardInterrupt) as exc:
        if latest and journal is not None:
            journal.save_result("timing", dataclasses.replace(latest[0], status="interrupted")
                                .as_dict())
            typer.echo(f"timing run {run_id}: stopped; the results so far are saved", err=True)
        fail(str(exc) or "interrupted", code=2 if isinstance(exc, TimingProbeError) else 130)
    finally:
        prober.close()
    typer.echo(f"timing run {run_id} against {url}")
    for name, line in summarize(result).items():
        typer.echo(f"{name:13s} {line}")
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    if journal is not None:
        recorder = Recorder(journal)
        found = result.findings(at=time.time())
        for finding in found:
            recorder.record(finding)
        recorder.close()
        journal.save_result("timing", {**result.as_dict(),
                                       "finding_ids": [f.id for f in found]})
    raise typer.Exit(code=1 if result.leaks else 0)


@app.command("drift")
def drift(
    model: Annotated[str, typer.Option(help="random-tiny or smollm2.")] = "smollm2",
    prompts: Annotated[int, typer.Option(min=1, max=8, help="Prompts of the fixed corpus.")] = 3,
    max_tokens: Annotated[int, typer.Option(min=16, help="Greedy tokens per prompt.")] = 1024,
    seed: Annotated[int, typer.Option(help="Which prompts of the corpus.")] = 0,
    pool_mb: Annotated[int, typer.Option("--pool-mb", help="INT8 KV pool budget in MiB.")] = 64,
    device: Annotated[str, typer.Option(help="cpu, cuda, or auto.")] = "cpu",
    per_layer: Annotated[bool, typer.Option(help="Attribute the error to layers.")] = True,
    as_json: Annotated[bool,
                       typer.Option("--json", help="Print the report as one JSON object.")] = False,
    config: ConfigOpt = None,
    findings: FindingsOpt = None,
    save: Annotated[bool,
                    typer.Option(help="Store the result and any finding for reports.")] = True,
) -> None:
    """Measure how far INT8 KV drifts from full precision on a fixed, seeded corpus of long greedy
    generations (teacher-forced KLD, top-1 agreement, first divergence, by position bucket and
    layer). Exit 1 when over the model's thresholds (a running engine would turn INT8 off)."""
    import json

    from audit.drift import run_drift_audit
    from gpu_prefix.drift import corpus
    from gpu_prefix.engine import Engine
    from gpu_prefix.errors import PrefixCacheError

    try:
        engine = Engine.from_name(model, device=device, kv_dtype="int8", pool_bytes=pool_mb * 2**20,
                                  max_tokens_limit=max_tokens, model_id=model)
    except (PrefixCacheError, ValueError) as exc:
        fail(str(exc))
    journal = recorder = None
    if save:
        journal = _journal(load_settings_or_fail(config), findings)
        recorder = Recorder(journal)
    try:
        report = run_drift_audit(engine, corpus(engine, prompts=prompts, seed=seed),
                                 max_tokens=max_tokens,
                                 recorder=recorder, journal=journal, per_layer=per_layer)
    finally:
        engine.close()
        if recorder is not None:
            recorder.close()
    if as_json:
        typer.echo(json.dumps(report.as_dict()))
    else:
        for name, f in {"all": report.overall, **report.buckets}.items():
            typer.echo(f"{name:8s} tokens {f.tokens:6d}  KLD mean {f.kld_mean:.3g}  p99 "
                       f"{f.kld_p99:.3g}  "
                       f"top-1 {f.top1_agreement:.4f}")
        typer.echo(f"first greedy divergence: {report.first_divergence} (median "
                   f"{report.first_divergence_median})")
        for e in report.layers:
            typer.echo(f"layer {e.layer:3d}: K error {e.k_rel_error:.4f}, V error "
                       f"{e.v_rel_error:.4f}")
        verdict = "; ".join(report.exceeded) if report.exceeded else "within thresholds"
        typer.echo("verdict: " + verdict)
    raise typer.Exit(code=1 if report.exceeded else 0)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _parse_since(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[:-1].isdigit() and value[-1] in units:
        return time.time() - int(value[:-1]) * units[value[-1]]
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        fail(f"--since {value!r}: use an ISO time (2026-11-27T20:00Z), Unix seconds, or an age "
             "such as 24h or 7d")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


@app.command("report")
def report(
    format: Annotated[str, typer.Option("--format", help="html, md or json.")] = "md",
    since: Annotated[
        str | None, typer.Option(help="Only findings since: ISO time, Unix seconds, or 24h/7d.")
    ] = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
    config: ConfigOpt = None,
    findings: FindingsOpt = None,
) -> None:
    """Write a report from the stored findings and the last scan, timing and drift results."""
    if format not in REPORT_FORMATS:
        fail(f"--format {format!r}: use one of {', '.join(REPORT_FORMATS)}")
    settings = load_settings_or_fail(config)
    journal = _journal(settings, findings)
    start = _parse_since(since)
    try:
        data = build_report(journal.findings(since=start), scan=journal.load_result("scan"),
                            timing=journal.load_result("timing"), since=start,
                            generated_at=time.time(), shadow=journal.load_result("shadow"),
                            drift=journal.load_result("drift"))
    except FindingsLogError as exc:
        fail(str(exc))
    text = render(data, format)  # type: ignore[arg-type]
    if output:
        Path(output).write_text(text, encoding="utf-8")
        typer.echo(f"wrote {output} ({data['summary']['findings']} findings)", err=True)
    else:
        sys.stdout.write(text)
