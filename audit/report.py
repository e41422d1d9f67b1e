"""Reports for people and machines, from the journal: stored findings, the last scan, the last
timing audit, the last INT8 KV drift audit, and what they cover.

* ``json``: one object (verdict with its coverage, assurance bounds, runs, findings), for
  machines and diffing.
* ``md``: a Markdown page for a ticket or a pull request.
* ``html``: one self-contained page (inline CSS and SVG, no script, nothing fetched) a reviewer
  can open from disk: the verdict and what it covers, the assurance bounds, the last scan, per
  timing level the empirical CDFs of hit and miss times (what the KS test compares), and the
  findings, grouped by the run that made them.

Both pages are rendered by jinja2 templates (``audit/templates/``) with autoescaping on for
HTML. No report ever contains prompt or response text: findings do not carry any.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any, Literal

import jinja2

from audit.assurance import assess
from audit.finding import FINDING_KINDS, KIND_MEANING, Finding, int8_off_where
from audit.verdict import judge

ReportFormat = Literal["json", "md", "html"]
REPORT_FORMATS: tuple[str, ...] = ("json", "md", "html")


def build_report(
    findings: Sequence[Finding],
    *,
    scan: Mapping[str, Any] | None,
    timing: Mapping[str, Any] | None,
    since: float | None,
    generated_at: float,
    shadow: Mapping[str, Any] | None = None,
    drift: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report as one JSON-ready dict (the other formats render this)."""
    by_kind = Counter(f.kind for f in findings)
    by_source = Counter(f.source for f in findings)
    verdict = judge(len(findings), scan, timing)
    return {
        "generated_at": generated_at,
        "since": since,
        "verdict": verdict.status,
        "coverage": verdict.as_dict(),
        "summary": {
            "findings": len(findings),
            "by_kind": {k: by_kind.get(k, 0) for k in FINDING_KINDS},  # type: ignore[call-overload]
            "by_source": dict(by_source),
        },
        "assurance": assurance_rows(scan, shadow),
        "findings": [f.as_dict() for f in findings],
        "findings_by_run": _group_by_run(findings, scan, timing),
        "scan": dict(scan) if scan else None,
        "timing": dict(timing) if timing else None,
        "shadow": dict(shadow) if shadow else None,
        "drift": dict(drift) if drift else None,
    }


def assurance_rows(scan: Mapping[str, Any] | None,
                   shadow: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """One row per (what was checked, tenant, model): how many, how many bad, the 95% upper
    bound on the bad rate. Scan rows count entries; shadow rows count sampled live hits."""
    rows: list[dict[str, Any]] = []

    def add(source: str, check: str, tenant: str, model: str, checked: int, bad: int) -> None:
        rows.append({"source": source, "check": check, "tenant": tenant, "model": model,
                     **assess(bad, checked).as_dict()})

    if scan:
        add("scan", "every stored check", "all", "all", scan.get("entries", 0),
            scan.get("entries", 0) - scan.get("clean", 0))
        for label, counts in sorted((scan.get("by_tenant_model") or {}).items()):
            tenant, _, model = label.partition("|")
            add("scan", "every stored check", tenant, model, counts["entries"],
                counts["bad"])
        rec = scan.get("recomputed") or {}
        judged = rec.get("pass", 0) + rec.get("finding", 0)
        if judged:
            add("scan", "answer recompute", "all", "all", judged, rec.get("finding", 0))
    for row in (shadow or {}).get("checked", []):
        add("shadow", row["check"], row["tenant"], row["model"], row["checked"], row["bad"])
    return rows


def _group_by_run(findings: Sequence[Finding], scan: Mapping[str, Any] | None,
                  timing: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The findings split by the run that made them: the scan and timing runs the report shows,
    live hits (the shadow auditor), and anything from other, earlier runs."""
    scan, timing = scan or {}, timing or {}
    scan_ids, timing_ids = set(scan.get("finding_ids", ())), set(timing.get("finding_ids", ()))
    groups: dict[str, list[str]] = {}
    for f in findings:
        if f.id in scan_ids:
            name = f"scan {scan.get('run_id', '-')} (shown above)"
        elif f.id in timing_ids:
            name = f"timing run {timing.get('run_id', '-')} (shown above)"
        elif f.source in ("hit", "fill"):  # the shadow auditor's sources
            name = "shadow auditor (live hits)"
        else:
            name = f"an earlier {f.source} run (not the one shown above)"
        groups.setdefault(name, []).append(f.id)
    return [{"run": k, "finding_ids": v} for k, v in groups.items()]


def _ts(value: float | None) -> str:
    if value is None:
        return "-"
    return dt.datetime.fromtimestamp(value, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pct(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 100:.3g}%"


def _nodes(by_node: Mapping[str, int]) -> str:
    """Entries per node; a single unnamed node (embedded or standalone Redis) is just a count."""
    if set(by_node) <= {"-"}:
        return "one node"
    return ", ".join(f"{node}: {n}" for node, n in sorted(by_node.items()))


def power_sentence(distance: float) -> str:
    """What a timing run of this size can detect (from :func:`audit.timing.detectable_distance`)."""
    if distance > 1:
        return ("with these trials the test cannot reach 90% power for any shift (a KS distance "
                "is at most 1): run more trials")
    return (f"with these trials the test detects a shift of KS distance {distance:.2f} or more "
            "with 90% power")


def _evidence(evidence: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(evidence.items()))


@cache
def _env(autoescape: bool) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("audit", "templates"),
        autoescape=autoescape, undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
    )
    env.filters.update(ts=_ts, pct=_pct, nodes=_nodes, evidence=_evidence)
    env.globals.update(KINDS=FINDING_KINDS, KIND_MEANING=KIND_MEANING, cdf=_cdf_chart,
                       power_sentence=power_sentence, drift_rows=_drift_rows,
                       drift_summary=_drift_summary)
    return env


DRIFT_COLUMNS = ("positions", "tokens", "mean KLD", "p99 KLD", "top-1 agreement")


def _drift_rows(drift: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """The INT8 drift table: the whole run, then each position bucket."""
    rows = [("all", drift)] + list(drift.get("buckets", {}).items())
    return [(name, str(f["tokens"]), f"{f['kld_mean']:.3g}", f"{f['kld_p99']:.3g}",
             f"{f['top1_agreement']:.4f}")
            for name, f in rows]


def _drift_summary(drift: Mapping[str, Any]) -> str:
    action = str(drift.get("action") or "model")
    where = int8_off_where(action)
    where = f" {where}" if where else ""
    verdict = (f"over its thresholds, INT8 turned off{where}: " + "; ".join(drift["exceeded"])
               if drift.get("exceeded") else "within its thresholds")
    return (f"Model {drift.get('model')}, {drift.get('prompts')} prompts x "
            f"{drift.get('max_tokens')} greedy tokens; "
            f"first greedy divergence median {drift.get('first_divergence_median')}; {verdict}.")


def render(report: Mapping[str, Any], fmt: ReportFormat) -> str:
    if fmt == "json":
        return json.dumps(report, indent=2, sort_keys=True, default=str) + "\n"
    if fmt == "md":
        return _env(False).get_template("report.md.j2").render(r=report)
    if fmt == "html":
        return _env(True).get_template("report.html.j2").render(r=report)
    raise ValueError(f"--format {fmt!r}: use one of {REPORT_FORMATS}")


#: Plot geometry of one CDF chart (pixels): the plot sits inside the margins, the legend below.
_W, _H, _LEFT, _RIGHT, _TOP, _BOTTOM = 400, 270, 48, 28, 26, 70


def _cdf_chart(hit: Sequence[float], miss: Sequence[float]) -> dict[str, Any] | None:
    """Coordinates for the template: empirical CDFs of hit and miss times (ms on x, share of
    trials on y), axis ticks, and the plot box. None without data."""
    values = [v * 1000 for v in (*hit, *miss)]
    if not values:
        return None
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    pw, ph = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def x(ms: float) -> float:
        return _LEFT + (ms - lo) / span * pw

    def y(p: float) -> float:
        return _TOP + (1 - p) * ph

    def path(sample: Sequence[float]) -> str:
        pts = sorted(v * 1000 for v in sample)
        if not pts:
            return ""
        n = len(pts)
        d = [f"M{x(pts[0]):.1f},{y(0):.1f}"]
        for i, v in enumerate(pts, 1):
            d.append(f"L{x(v):.1f},{y((i - 1) / n):.1f}L{x(v):.1f},{y(i / n):.1f}")
        return "".join(d)

    return {
        "w": _W, "h": _H, "left": _LEFT, "top": _TOP, "pw": pw, "ph": ph,
        "hit": path(hit), "miss": path(miss),
        "xticks": [(x(lo + t * span), f"{lo + t * span:.1f}") for t in (0, 0.5, 1)],
        "yticks": [(y(p), f"{p:.1f}") for p in (0, 0.5, 1)],
        "legend_y": _TOP + ph + 44,
    }
