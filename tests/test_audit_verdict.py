"""The report's verdict rules (clean only with full coverage) and the assurance bounds."""

from __future__ import annotations

import math

import pytest
from scipy import optimize, stats

from audit.assurance import assess, upper_bound
from audit.report import build_report, render
from audit.timing import detectable_distance, trials_for
from audit.verdict import judge


def level(name: str, *, shared: bool, trials: int = 250) -> dict:
    return {"name": name, "shared": shared, "trials": trials, "leak": False, "p_value": 0.5,
            "statistic": 0.1, "verdict": "x", "median_hit_s": 0.01, "median_miss_s": 0.01,
            "hit_times": [0.01], "miss_times": [0.01]}


SCAN = {"run_id": "s1", "target": "redis://h:6379/0", "started_at": 1.0, "finished_at": 2.0,
        "entries": 100, "clean": 100, "unreadable": 0, "findings": 0, "material_checked": 100,
        "recomputed": {}, "by_tenant_model": {"acme|m": {"entries": 100, "bad": 0}}}


def timing(*levels: dict, status: str = "complete", **extra) -> dict:
    return {"run_id": "t1", "target": "http://svc", "started_at": 1.0, "finished_at": 2.0,
            "status": status, "leaks": [], "notes": [], "levels": list(levels),
            "config": {"trials": 250, "prompt_words": 300, "shared_fraction": 0.9,
                       "alpha": 1e-4, "warmup": 3}, **extra}


FULL = timing(level("same_key", shared=True), level("other_tenant", shared=False))


class TestVerdict:
    def test_a_full_scan_and_a_full_timing_run_with_nothing_found_is_clean(self):
        v = judge(0, SCAN, FULL)
        assert v.status == "clean" and not v.reasons
        assert any("scan s1 of redis://h:6379/0" in c for c in v.covered)
        assert any("timing run t1" in c and "same_key, other_tenant" in c for c in v.covered)

    def test_nothing_recorded_is_incomplete_not_clean(self):
        v = judge(0, None, None)
        assert v.status == "incomplete"
        assert any("no scan recorded" in r for r in v.reasons)
        assert any("no timing audit recorded" in r for r in v.reasons)

    def test_a_timing_run_with_only_the_positive_control_is_incomplete(self):
        v = judge(0, SCAN, timing(level("same_key", shared=True)))
        assert v.status == "incomplete"
        assert v.reasons == ("timing level other_tenant was not tested",)

    def test_a_control_that_showed_no_cache_makes_isolation_inconclusive(self):
        v = judge(0, SCAN, timing(level("same_key", shared=False),
                                  level("other_tenant", shared=False)))
        assert v.status == "incomplete" and "inconclusive" in v.reasons[0]

    def test_an_interrupted_timing_run_is_incomplete_and_says_how_far_it_got(self):
        v = judge(0, SCAN, timing(level("same_key", shared=True, trials=40),
                                  level("other_tenant", shared=False, trials=40),
                                  status="interrupted"))
        assert v.status == "incomplete"
        assert v.reasons == ("the timing run did not finish (interrupted): 40 of 250 trials "
                             "per level",)

    def test_a_user_scoped_run_needs_the_other_user_level(self):
        v = judge(0, SCAN, timing(level("same_key", shared=True),
                                  level("other_tenant", shared=False), user_scoped=True))
        assert v.reasons == ("timing level other_user was not tested",)

    def test_an_empty_scan_checked_nothing(self):
        v = judge(0, {**SCAN, "entries": 0, "clean": 0}, FULL)
        assert v.status == "incomplete" and "saw no entries" in v.reasons[0]

    def test_findings_win_over_gaps_and_the_gaps_are_still_listed(self):
        v = judge(2, None, FULL)
        assert v.status == "findings"
        assert v.reasons[0].startswith("2 finding(s)") and "no scan recorded" in v.reasons[1]

    @pytest.mark.parametrize("fmt", ["md", "html"])
    def test_the_rendered_report_never_says_clean_beside_no_scan(self, fmt):
        r = build_report([], scan=None, timing=timing(level("same_key", shared=True)),
                         since=None, generated_at=1e9)
        text = render(r, fmt)
        assert r["verdict"] == "incomplete" and "incomplete" in text
        body = text.split("</style>")[-1]  # the stylesheet names every badge colour
        assert "clean" not in body
        assert "No scan recorded" in text


class TestAssurance:
    def test_none_bad_in_n_bounds_the_rate_near_three_over_n(self):
        for n in (30, 300, 3000):
            a = assess(0, n)
            exact = 1 - 0.05 ** (1 / n)
            assert math.isclose(a.upper, exact, rel_tol=1e-9)
            assert a.rule_of_three == 3 / n and math.isclose(a.upper, 3 / n, rel_tol=0.1)

    def test_some_bad_gives_the_exact_binomial_bound(self):
        # The bound is the rate at which seeing at most 2 bad in 100 has probability 5%.
        p = optimize.brentq(lambda p: stats.binom.cdf(2, 100, p) - 0.05, 1e-9, 1 - 1e-9)
        assert upper_bound(2, 100) == pytest.approx(p, rel=1e-6)
        assert 0.06 < p < 0.063
        assert assess(2, 100).rule_of_three is None

    def test_nothing_checked_proves_nothing(self):
        assert upper_bound(0, 0) == 1.0 and upper_bound(5, 5) == 1.0

    def test_impossible_counts_are_refused(self):
        with pytest.raises(ValueError, match="bad=3, checked=2"):
            upper_bound(3, 2)

    def test_the_report_bounds_each_tenant_and_model_the_scan_saw(self):
        scan = {**SCAN, "clean": 99,
                "by_tenant_model": {"acme|m": {"entries": 60, "bad": 1},
                                    "globex|m": {"entries": 40, "bad": 0}}}
        rows = {(a["tenant"], a["model"]): a for a in
                build_report([], scan=scan, timing=FULL, since=None, generated_at=1.0)["assurance"]}
        assert rows[("all", "all")]["checked"] == 100 and rows[("all", "all")]["bad"] == 1
        assert rows[("globex", "m")]["upper"] == pytest.approx(1 - 0.05 ** (1 / 40))
        assert rows[("acme", "m")]["upper"] == pytest.approx(upper_bound(1, 60))


class TestTimingSizing:
    def test_the_default_run_detects_a_ks_distance_of_about_a_fifth(self):
        assert 0.25 < detectable_distance(250, 1e-4) < 0.3

    def test_trials_for_a_distance_is_the_inverse_of_the_detectable_distance(self):
        for d in (0.1, 0.3, 0.5):
            n = trials_for(d, 1e-4)
            assert detectable_distance(n, 1e-4) <= d < detectable_distance(n - 1, 1e-4)


class TestShadowCoverage:
    """What the shadow auditor checked reaches the report: bounds per tenant and model, and the
    blast radius of a bad entry (which scopes were served it, how often, from when to when)."""

    def test_checked_samples_and_a_bad_entrys_blast_radius_are_saved_for_the_report(
            self, tmp_path):
        from audit import FileJournal
        from tests import audit_world as w
        from tests.test_audit_shadow import auditor

        a = auditor(tmp_path, sample_rate=0.5)
        bad_key = w.key_for("acme", 1)
        bad = w.encode_entry(w.entry_for(bad_key, text="a wrong answer stored under a good key"),
                             keys=w.KEYS)
        for t in range(5):
            a.process(w.hit_event("acme", 1, bad, at=w.NOW + t))
        for i in range(40):
            k = w.key_for("globex", i)
            a.process(w.hit_event("globex", i, w.encode_entry(w.entry_for(k), keys=w.KEYS)))
        a.coverage.check_valid()
        a.stop(timeout=5)
        shadow = FileJournal(tmp_path / "f.jsonl").load_result("shadow")
        rows = {(r["tenant"], r["model"]): r for r in shadow["checked"]}
        assert rows[("acme", w.MODEL)]["checked"] == 5 and rows[("acme", w.MODEL)]["bad"] == 5
        assert (rows[("globex", w.MODEL)]["checked"], rows[("globex", w.MODEL)]["bad"]) == (40, 0)
        (radius,) = shadow["blast_radius"]
        assert radius["digest"] == bad_key.digest.hex()
        assert radius["scopes"] == {"tenant:acme": 5} and radius["sampled_hits"] == 5
        assert radius["estimated_hits"] == 10  # 5 sampled at a rate of 0.5
        assert (radius["first_seen"], radius["last_seen"]) == (w.NOW, w.NOW + 4)
        assert "mismatch" in radius["kinds"]

        report = build_report([], scan=SCAN, timing=FULL, since=None, generated_at=1.0,
                              shadow=shadow)
        globex = next(r for r in report["assurance"]
                      if r["source"] == "shadow" and r["tenant"] == "globex")
        assert globex["upper"] == pytest.approx(1 - 0.05 ** (1 / 40))
        for fmt in ("md", "html"):
            text = render(report, fmt)
            assert bad_key.digest.hex() in text and "tenant:acme" in text

    def test_bookkeeping_stays_bounded(self):
        from audit.coverage import Coverage

        c = Coverage(started_at=0.0, sample_rate=1.0, max_entries=10, max_flagged=2)
        for i in range(100):
            c.record(tenant="t", model="m", event="hit", digest=f"{i:032x}", scope="tenant:t",
                     at=float(i), findings=[])
            c.check_valid()
        assert c.as_dict()["checked"] == [{"tenant": "t", "model": "m",
                                           "check": "every check on sampled hits",
                                           "checked": 100, "bad": 0}]

    def test_a_run_too_small_for_any_shift_says_so(self):
        from audit.report import power_sentence

        assert "cannot reach 90% power" in power_sentence(detectable_distance(20, 1e-4))
        assert "0.29 or more" in power_sentence(detectable_distance(250, 1e-4))
