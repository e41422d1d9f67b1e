"""Reports for people and machines, from the journal: stored findings, the last scan, the last
timing audit, the last INT8 KV drift audit.

* ``json``: one object (summary, findings, scan, timing, drift), for machines and diffing.
* ``md``: a Markdown page for a ticket or a pull request.
* ``html``: one self-contained page (inline CSS and SVG, no script, nothing fetched) a reviewer
  can open from disk: the summary, the findings table and, per timing level, the empirical CDFs
  of hit and miss times, which is what the KS test compares.

No report ever contains prompt or response text: findings do not carry any.
"""

from __future__ import annotations

import datetime as dt
import html
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from audit.finding import FINDING_KINDS, KIND_MEANING, Finding

ReportFormat = Literal["json", "md", "html"]
REPORT_FORMATS: tuple[str, ...] = ("json", "md", "html")


def build_report(
    findings: Sequence[Finding],
    *,
    scan: Mapping[str, Any] | None,
    timing: Mapping[str, Any] | None,
    since: float | None,
    generated_at: float,
    drift: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report as one JSON-ready dict (the other formats render this)."""
    by_kind = Counter(f.kind for f in findings)
    by_source = Counter(f.source for f in findings)
    verdict = "clean"
    if (findings or (scan and scan.get("findings")) or (timing and timing.get("leaks"))
            or (drift and drift.get("exceeded"))):
        verdict = "findings"
    return {
        "generated_at": generated_at,
        "since": since,
        "verdict": verdict,
        "summary": {
            "findings": len(findings),
            "by_kind": {k: by_kind.get(k, 0) for k in FINDING_KINDS},
            "by_source": dict(by_source),
        },
        "findings": [f.as_dict() for f in findings],
        "scan": dict(scan) if scan else None,
        "timing": dict(timing) if timing else None,
        "drift": dict(drift) if drift else None,
    }


def _ts(value: float | None) -> str:
    if value is None:
        return "-"
    return dt.datetime.fromtimestamp(value, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def render(report: Mapping[str, Any], fmt: ReportFormat) -> str:
    if fmt == "json":
        return json.dumps(report, indent=2, sort_keys=True, default=str) + "\n"
    if fmt == "md":
        return _markdown(report)
    if fmt == "html":
        return _html(report)
    raise ValueError(f"--format {fmt!r}: use one of {REPORT_FORMATS}")


def _evidence_line(evidence: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(evidence.items()))


DRIFT_COLUMNS = ("positions", "tokens", "mean KLD", "p99 KLD", "top-1 agreement")


def _drift_rows(drift: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """The drift table: the whole run, then each position bucket."""
    rows = [("all", drift)] + list(drift.get("buckets", {}).items())
    return [(name, str(f["tokens"]), f"{f['kld_mean']:.3g}", f"{f['kld_p99']:.3g}", f"{f['top1_agreement']:.4f}")
            for name, f in rows]


def _drift_summary(drift: Mapping[str, Any]) -> str:
    verdict = ("over its thresholds, INT8 turned off: " + "; ".join(drift["exceeded"])
               if drift.get("exceeded") else "within its thresholds")
    return (f"Model `{drift.get('model')}`, {drift.get('prompts')} prompts x {drift.get('max_tokens')} greedy tokens; "
            f"first greedy divergence median {drift.get('first_divergence_median')}; {verdict}.")


def _markdown(r: Mapping[str, Any]) -> str:
    s = r["summary"]
    out = [
        "# Cache audit report",
        "",
        f"Generated {_ts(r['generated_at'])}; findings since {_ts(r['since'])}. "
        f"Verdict: **{r['verdict']}**.",
        "",
        "## Summary",
        "",
        "| kind | findings | what it means |",
        "|---|---:|---|",
    ]
    for kind in FINDING_KINDS:
        out.append(f"| `{kind}` | {s['by_kind'].get(kind, 0)} | {KIND_MEANING[kind]} |")
    scan = r.get("scan")
    out += ["", "## Last scan", ""]
    if scan:
        out.append(
            f"{_ts(scan.get('started_at'))}: {scan.get('entries', 0)} entries, "
            f"{scan.get('findings', 0)} findings, {scan.get('unreadable', 0)} unreadable, "
            f"{scan.get('reclaimable', 0)} reclaimable (old epochs), "
            f"nodes: {scan.get('entries_by_node', {})}."
        )
        out.append("")
        out.append(_scan_coverage(scan))
    else:
        out.append("No scan recorded. Run `cachesvc audit scan`.")
    timing = r.get("timing")
    out += ["", "## Last timing audit", ""]
    if timing:
        out += [f"Target `{timing.get('target')}`, alpha {timing['config']['alpha']}, "
                f"{timing['config']['trials']} trials per level.", "",
                "| level | p-value | KS D | median hit (ms) | median miss (ms) | verdict |",
                "|---|---:|---:|---:|---:|---|"]
        for lv in timing.get("levels", []):
            out.append(f"| {lv['name']} | {lv['p_value']:.3g} | {lv['statistic']:.3f} | "
                       f"{lv['median_hit_s'] * 1000:.1f} | {lv['median_miss_s'] * 1000:.1f} | "
                       f"{lv['verdict']} |")
        for note in timing.get("notes", []):
            out += ["", f"> {note}"]
    else:
        out.append("No timing audit recorded. Run `cachesvc audit timing`.")
    drift = r.get("drift")
    out += ["", "## Last INT8 KV drift audit", ""]
    if drift:
        out += [_drift_summary(drift), "", "| " + " | ".join(DRIFT_COLUMNS) + " |", "|---|---:|---:|---:|---:|"]
        out += ["| " + " | ".join(row) + " |" for row in _drift_rows(drift)]
    else:
        out.append("No drift audit recorded. Run `cachesvc audit drift`.")
    out += ["", "## Findings", ""]
    if r["findings"]:
        out += ["| time | kind | source | scope | model | epoch | storage key | summary | evidence |",
                "|---|---|---|---|---|---:|---|---|---|"]
        for f in r["findings"]:
            e = f["entry"]
            out.append(
                f"| {_ts(f['at'])} | `{f['kind']}` | {f['source']} | {e.get('scope') or '-'} | "
                f"{e.get('model') or '-'} | {e.get('epoch') if e.get('epoch') is not None else '-'} | "
                f"`{e.get('storage_key') or '-'}` | {f['summary']} | "
                f"{_evidence_line(f['evidence']).replace('|', '/')} |"
            )
    else:
        out.append("No findings.")
    return "\n".join(out) + "\n"


_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{margin-bottom:.2em} table{border-collapse:collapse;width:100%;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#f3f3f3} td.n{text-align:right} code{font-size:12px;word-break:break-all}
.verdict{display:inline-block;padding:2px 10px;border-radius:4px;color:#fff;font-weight:600}
.clean{background:#2e7d32} .findings{background:#c62828} .muted{color:#777}
.charts{display:flex;flex-wrap:wrap;gap:1em} figure{margin:0} figcaption{font-size:12px}
"""


def _cdf_svg(hit: Sequence[float], miss: Sequence[float], title: str) -> str:
    """Empirical CDFs of hit (blue) and miss (orange) times, milliseconds on x."""
    w, h, pad = 380, 240, 40
    values = [v * 1000 for v in (*hit, *miss)]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0

    def x(v: float) -> float:
        return pad + (v * 1000 - lo) / span * (w - 2 * pad)

    def y(p: float) -> float:
        return h - pad - p * (h - 2 * pad)

    def path(sample: Sequence[float]) -> str:
        pts = sorted(sample)
        n = len(pts)
        if not n:
            return ""
        d = [f"M{x(pts[0]):.1f},{y(0):.1f}"]
        for i, v in enumerate(pts, 1):
            d.append(f"L{x(v):.1f},{y((i - 1) / n):.1f}L{x(v):.1f},{y(i / n):.1f}")
        return "".join(d)

    ticks = "".join(
        f'<text x="{pad + t * (w - 2 * pad):.1f}" y="{h - pad + 14}" font-size="10" '
        f'text-anchor="middle">{lo + t * span:.1f}</text>'
        for t in (0, 0.5, 1)
    )
    return (
        f'<figure><svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'role="img" aria-label="{html.escape(title)}">'
        f'<rect x="{pad}" y="{pad}" width="{w - 2 * pad}" height="{h - 2 * pad}" fill="none" stroke="#999"/>'
        f'<path d="{path(hit)}" fill="none" stroke="#1565c0" stroke-width="2"/>'
        f'<path d="{path(miss)}" fill="none" stroke="#ef6c00" stroke-width="2"/>'
        f'{ticks}<text x="{w / 2}" y="{h - 6}" font-size="11" text-anchor="middle">time to first token (ms)</text>'
        f'<text x="{pad}" y="{pad - 8}" font-size="12" font-weight="600">{html.escape(title)}</text>'
        f'<text x="{w - pad}" y="{pad + 14}" font-size="11" text-anchor="end" fill="#1565c0">hit trials</text>'
        f'<text x="{w - pad}" y="{pad + 28}" font-size="11" text-anchor="end" fill="#ef6c00">miss trials</text>'
        f"</svg><figcaption>Empirical CDFs; a hit curve left of the miss curve means the probe "
        f"can tell.</figcaption></figure>"
    )


def _html(r: Mapping[str, Any]) -> str:
    e = html.escape
    s = r["summary"]
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<title>Cache audit report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Cache audit report</h1>",
        f"<p>Generated {e(_ts(r['generated_at']))}; findings since {e(_ts(r['since']))}. "
        f"Verdict: <span class='verdict {e(r['verdict'])}'>{e(r['verdict'])}</span></p>",
        "<h2>Summary</h2><table><tr><th>kind</th><th>findings</th><th>what it means</th></tr>",
    ]
    for kind in FINDING_KINDS:
        parts.append(f"<tr><td><code>{kind}</code></td><td class=n>{s['by_kind'].get(kind, 0)}</td>"
                     f"<td>{e(KIND_MEANING[kind])}</td></tr>")
    parts.append("</table>")
    scan = r.get("scan")
    parts.append("<h2>Last scan</h2>")
    if scan:
        parts.append(
            "<table><tr><th>started</th><th>entries</th><th>findings</th><th>unreadable</th>"
            "<th>reclaimable (old epochs)</th><th>key material checked</th><th>entries per node</th></tr>"
            f"<tr><td>{e(_ts(scan.get('started_at')))}</td><td class=n>{scan.get('entries', 0)}</td>"
            f"<td class=n>{scan.get('findings', 0)}</td><td class=n>{scan.get('unreadable', 0)}</td>"
            f"<td class=n>{scan.get('reclaimable', 0)}</td><td class=n>{scan.get('material_checked', 0)}</td>"
            f"<td>{e(json.dumps(scan.get('entries_by_node', {})))}</td></tr></table>"
            f"<p>{e(_scan_coverage(scan))}</p>"
        )
    else:
        parts.append("<p class=muted>No scan recorded. Run <code>cachesvc audit scan</code>.</p>")
    timing = r.get("timing")
    parts.append("<h2>Last timing audit</h2>")
    if timing:
        c = timing["config"]
        parts.append(
            f"<p>Target <code>{e(str(timing.get('target')))}</code>; {c['trials']} trials per level, "
            f"{c['prompt_words']} words per prompt, {int(c['shared_fraction'] * 100)}% shared "
            f"prefix, alpha {c['alpha']} (one-sided two-sample KS test).</p>"
            "<table><tr><th>level</th><th>p-value</th><th>KS D</th><th>median hit (ms)</th>"
            "<th>median miss (ms)</th><th>verdict</th></tr>"
        )
        for lv in timing.get("levels", []):
            parts.append(
                f"<tr><td>{e(lv['name'])}</td><td class=n>{lv['p_value']:.3g}</td>"
                f"<td class=n>{lv['statistic']:.3f}</td><td class=n>{lv['median_hit_s'] * 1000:.1f}</td>"
                f"<td class=n>{lv['median_miss_s'] * 1000:.1f}</td><td>{e(lv['verdict'])}</td></tr>"
            )
        parts.append("</table><div class=charts>")
        for lv in timing.get("levels", []):
            parts.append(_cdf_svg(lv.get("hit_times", []), lv.get("miss_times", []), lv["name"]))
        parts.append("</div>")
        for note in timing.get("notes", []):
            parts.append(f"<p class=muted>{e(note)}</p>")
    else:
        parts.append("<p class=muted>No timing audit recorded. Run <code>cachesvc audit timing</code>.</p>")
    drift = r.get("drift")
    parts.append("<h2>Last INT8 KV drift audit</h2>")
    if drift:
        parts.append(f"<p>{e(_drift_summary(drift))}</p><table><tr>"
                     + "".join(f"<th>{e(c)}</th>" for c in DRIFT_COLUMNS) + "</tr>")
        for row in _drift_rows(drift):
            parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
        parts.append("</table>")
    else:
        parts.append("<p class=muted>No drift audit recorded. Run <code>cachesvc audit drift</code>.</p>")
    parts.append("<h2>Findings</h2>")
    if r["findings"]:
        parts.append("<table><tr><th>time</th><th>kind</th><th>source</th><th>scope</th><th>model</th>"
                     "<th>epoch</th><th>storage key</th><th>summary</th><th>evidence</th></tr>")
        for f in r["findings"]:
            en = f["entry"]
            parts.append(
                f"<tr><td>{e(_ts(f['at']))}</td><td><code>{e(f['kind'])}</code></td>"
                f"<td>{e(f['source'])}</td><td>{e(str(en.get('scope') or '-'))}</td>"
                f"<td>{e(str(en.get('model') or '-'))}</td>"
                f"<td class=n>{e(str(en.get('epoch') if en.get('epoch') is not None else '-'))}</td>"
                f"<td><code>{e(str(en.get('storage_key') or '-'))}</code></td>"
                f"<td>{e(f['summary'])}</td><td><code>{e(_evidence_line(f['evidence']))}</code></td></tr>"
            )
        parts.append("</table>")
    else:
        parts.append("<p>No findings.</p>")
    parts.append("</body></html>\n")
    return "".join(parts)


def _scan_coverage(scan: Mapping[str, Any]) -> str:
    """What the scan could and could not check, in one sentence (a reviewer reads the gaps)."""
    readable = scan.get("entries", 0) - scan.get("unreadable", 0)
    material = scan.get("material_checked", 0)
    parts = [f"Key material carried by {material} of {readable} readable entries"]
    if material and not scan.get("material_digest_checked", True):
        parts.append("keyed material digests not recomputed (the service's secret was not known)")
    recomputed = scan.get("recomputed") or {}
    if recomputed:
        parts.append(f"answers recomputed: {dict(sorted(recomputed.items()))}")
    else:
        parts.append("answers not recomputed (run the scan with --recompute)")
    return "; ".join(parts) + "."
