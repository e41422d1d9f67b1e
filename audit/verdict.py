"""The report's verdict and what it covers.

A verdict states its coverage. ``findings`` when anything was found; otherwise ``clean`` only
when every part of the audit ran in full: a scan was recorded, and a timing run tested every
sharing level that can leak (``other_tenant``; ``other_user`` when the run was for a per-user
tenant) with a positive control that showed the cache, to the end. Anything less is
``incomplete``, with one reason per gap, so a green badge never sits beside "no scan recorded".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

VerdictStatus = Literal["clean", "incomplete", "findings"]

#: Levels a timing run must have tested for a clean verdict.
REQUIRED_LEVELS: tuple[str, ...] = ("same_key", "other_tenant")


@dataclass(frozen=True, kw_only=True, slots=True)
class Verdict:
    status: VerdictStatus
    #: Why the verdict is not ``clean`` (findings, then gaps), one sentence each.
    reasons: Sequence[str] = field(default_factory=tuple)
    #: Checks that ran, and over what.
    covered: Sequence[str] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "reasons": list(self.reasons),
                "covered": list(self.covered)}


def judge(findings: int, scan: Mapping[str, Any] | None,
          timing: Mapping[str, Any] | None) -> Verdict:
    """The verdict over ``findings`` (count in the report's window), the last scan and the last
    timing run (their saved results, or None)."""
    found: list[str] = []
    gaps: list[str] = []
    covered: list[str] = []
    if findings:
        found.append(f"{findings} finding(s) recorded in the report's window")
    if scan is None:
        gaps.append("no scan recorded: run `cachesvc audit scan`")
    else:
        if scan.get("findings"):
            found.append(f"the last scan found {scan['findings']} problem(s)")
        covered.append(_scan_coverage(scan))
        if not scan.get("entries"):
            gaps.append("the last scan saw no entries, so it checked nothing")
    if timing is None:
        gaps.append("no timing audit recorded: run `cachesvc audit timing` with a key of "
                    "another tenant (--probe-key-other-tenant)")
    else:
        if timing.get("leaks"):
            found.append(f"the timing audit measured sharing at: {', '.join(timing['leaks'])}")
        gaps.extend(_timing_gaps(timing))
        tested = [lv["name"] for lv in timing.get("levels", [])]
        covered.append(f"timing run {timing.get('run_id', '-')} against "
                       f"{timing.get('target', '-')}: levels {', '.join(tested) or 'none'}, "
                       f"{timing.get('config', {}).get('trials', '?')} trials per level")
    if found:
        return Verdict(status="findings", reasons=(*found, *gaps), covered=tuple(covered))
    if gaps:
        return Verdict(status="incomplete", reasons=tuple(gaps), covered=tuple(covered))
    return Verdict(status="clean", covered=tuple(covered))


def _timing_gaps(timing: Mapping[str, Any]) -> list[str]:
    levels = {lv["name"]: lv for lv in timing.get("levels", [])}
    required = list(REQUIRED_LEVELS)
    if timing.get("user_scoped"):
        required.append("other_user")
    gaps = [f"timing level {name} was not tested" for name in required if name not in levels]
    control = levels.get("same_key")
    if control is not None and not control.get("shared"):
        gaps.append("the timing positive control (same_key) showed no cache effect, so "
                    "'isolated' verdicts are inconclusive")
    if timing.get("status", "complete") != "complete":
        done = min((lv.get("trials", 0) for lv in levels.values()), default=0)
        gaps.append(f"the timing run did not finish ({timing.get('status')}): "
                    f"{done} of {timing.get('config', {}).get('trials', '?')} trials per level")
    return gaps


def _scan_coverage(scan: Mapping[str, Any]) -> str:
    readable = scan.get("entries", 0) - scan.get("unreadable", 0)
    checks = ["decode and checksum", "placement", "canaries"]
    if scan.get("registry_checked", True):
        checks.append("registry")
    if scan.get("material_checked"):
        checks.append(f"key material ({scan['material_checked']} of {readable} entries"
                      + ("" if scan.get("material_digest_checked", True)
                         else "; keyed digests not recomputed: secret unknown") + ")")
    recomputed = scan.get("recomputed") or {}
    if recomputed:
        checks.append(f"answers recomputed ({recomputed.get('pass', 0)} passed, "
                      f"{recomputed.get('finding', 0)} wrong)")
    else:
        checks.append("answers not recomputed (run the scan with --recompute)")
    return (f"scan {scan.get('run_id', '-')} of {scan.get('target', '-')}: "
            f"{scan.get('entries', 0)} entries; checks: {', '.join(checks)}")
