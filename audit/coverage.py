"""What the shadow auditor has checked, for the report's assurance bounds and blast radius.

Kept by the auditor's worker thread (off the request path), bounded:

* per ``(tenant, model, event)``: samples checked and samples with a finding; tenants and
  models come from the config and the registry, so the table stays small;
* per entry (by digest): which scopes were served it, how many sampled hits, first and last
  seen. Only the ``max_entries`` most recently seen entries are kept (LRU), plus every entry
  with a finding (its blast radius), up to ``max_flagged``.

Counts are of *sampled* events: at sample rate ``r`` an entry seen in ``n`` sampled hits was
served about ``n / r`` times. :meth:`as_dict` is what the auditor saves to the journal as its
``shadow`` result, once a minute and at stop; it covers this process since it started.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from typing import Any

from audit.finding import Finding


class Coverage:
    def __init__(self, *, started_at: float, sample_rate: float, max_entries: int = 10_000,
                 max_flagged: int = 1_000) -> None:
        self.started_at = started_at
        self.sample_rate = sample_rate
        self.max_entries = max_entries
        self.max_flagged = max_flagged
        self._checked: Counter[tuple[str, str, str]] = Counter()
        self._bad: Counter[tuple[str, str, str]] = Counter()
        self._entries: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._flagged: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def record(self, *, tenant: str, model: str, event: str, digest: str | None, scope: str,
               at: float, findings: list[Finding]) -> None:
        """One checked sample and its findings."""
        key = (tenant, model, event)
        with self._lock:
            self._checked[key] += 1
            if findings:
                self._bad[key] += 1
            if digest is None or event != "hit":
                return
            stats = self._flagged.get(digest) or self._entries.pop(digest, None)
            if stats is None:
                stats = {"scopes": Counter(), "sampled_hits": 0, "first_seen": at,
                         "last_seen": at, "kinds": set()}
            stats["scopes"][scope] += 1
            stats["sampled_hits"] += 1
            stats["last_seen"] = at
            stats["kinds"].update(f.kind for f in findings)
            if digest in self._flagged or (findings and len(self._flagged) < self.max_flagged):
                self._flagged[digest] = stats
                return
            self._entries[digest] = stats
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def check_valid(self) -> None:
        assert len(self._entries) <= self.max_entries
        assert len(self._flagged) <= self.max_flagged
        assert not set(self._entries) & set(self._flagged)
        assert all(self._bad[k] <= n for k, n in self._checked.items())

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "started_at": self.started_at,
                "sample_rate": self.sample_rate,
                "checked": [{"tenant": t, "model": m, "check": f"every check on sampled {e}s",
                             "checked": n, "bad": self._bad[(t, m, e)]}
                            for (t, m, e), n in sorted(self._checked.items())],
                "blast_radius": [{
                    "digest": d, "kinds": sorted(s["kinds"]),
                    "scopes": dict(s["scopes"]), "sampled_hits": s["sampled_hits"],
                    "estimated_hits": (round(s["sampled_hits"] / self.sample_rate)
                                       if self.sample_rate else None),
                    "first_seen": s["first_seen"], "last_seen": s["last_seen"],
                } for d, s in sorted(self._flagged.items())],
            }
