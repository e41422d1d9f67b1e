"""Reports from the journal, and the ``cachesvc audit`` commands end to end."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re

import pytest
from typer.testing import CliRunner

from audit import FileJournal
from audit.report import build_report, render
from cachesvc.cli import app
from cachesvc.store import EntryKeys, decode_entry, encode_entry, open_store
from keying.framing import DEFAULT_MATERIAL_SECRET
from tests import audit_world as w
from tests.test_audit_journal import finding

TIMING = {
    "target": "http://x", "started_at": 1.0, "finished_at": 2.0, "leaks": ["other_tenant"],
    "notes": [],
    "config": {"trials": 3, "prompt_words": 50, "shared_fraction": 0.9, "alpha": 1e-4, "warmup": 0},
    "levels": [{"name": "other_tenant", "p_value": 1e-9, "statistic": 1.0, "verdict": "LEAK",
                "median_hit_s": 0.01, "median_miss_s": 0.05, "leak": True,
                "hit_times": [0.01, 0.011, 0.012], "miss_times": [0.05, 0.051, 0.049]}],
}


def report(findings=(), scan=None, timing=None):
    return build_report(list(findings), scan=scan, timing=timing, since=None, generated_at=1e9)


class TestReport:
    def test_findings_are_counted_by_kind(self):
        r = report([finding(1, kind="canary"), finding(2, kind="canary"), finding(3)])
        assert r["summary"]["by_kind"]["canary"] == 2 and r["verdict"] == "findings"

    def test_a_timing_leak_alone_makes_the_verdict_findings(self):
        assert report(timing=TIMING)["verdict"] == "findings"

    def test_the_shadow_auditors_findings_are_grouped_as_live_hits_not_an_earlier_run(self):
        live = [dataclasses.replace(finding(1), source="hit"),
                dataclasses.replace(finding(2), source="fill")]
        runs = report([*live, finding(3)])["findings_by_run"]
        by_name = {r["run"]: r["finding_ids"] for r in runs}
        assert by_name["shadow auditor (live hits)"] == [f.id for f in live]
        assert not any("earlier hit" in name or "earlier fill" in name for name in by_name)

    def test_json_is_the_report_itself(self):
        r = report([finding(1)])
        assert json.loads(render(r, "json")) == json.loads(json.dumps(r))

    def test_markdown_has_the_summary_and_one_row_per_finding(self):
        text = render(report([finding(1), finding(2)], timing=TIMING), "md")
        assert "| `stale` | 2 |" in text
        assert text.count("| finding ") == 2
        assert "| other_tenant | 3 | 1e-09 |" in text

    def test_html_is_one_self_contained_page_with_a_timing_chart(self):
        text = render(report([finding(1)], timing=TIMING), "html")
        assert text.startswith("<!doctype html>")
        assert "<svg" in text and text.count("<path") == 2
        assert not re.search(r"<(script|link)\b|src=|https?://(?!x\b)",
                             text.replace("http://www.w3.org/2000/svg", ""))

    def test_the_verdict_says_what_the_scan_could_not_check(self):
        scan = {"started_at": 1.0, "entries": 10, "unreadable": 1, "findings": 0,
                "material_checked": 6, "material_digest_checked": False, "recomputed": {}}
        for fmt in ("md", "html"):
            text = render(report(scan=scan), fmt)
            assert "key material (6 of 9 entries; keyed digests not recomputed" in text
            assert "answers not recomputed (run the scan with --recompute)" in text
        scan.update(material_digest_checked=True, recomputed={"pass": 5, "finding": 1})
        text = render(report(scan=scan), "md")
        assert "secret" not in text and "answers recomputed (5 passed, 1 wrong)" in text

    def test_html_escapes_what_it_shows(self):
        f = finding(1)
        f = type(f)(**{**{s: getattr(f, s) for s in f.__slots__}, "summary": "<b>x</b>"})
        assert "<b>x</b>" not in render(report([f]), "html")


runner = CliRunner()


def rollout(redis_url: str) -> int:
    """Roll the world's model out in the Redis registry; its epoch."""
    import redis.asyncio

    from invalidation import RedisRegistry

    async def go() -> int:
        client = redis.asyncio.Redis.from_url(redis_url)
        done = await RedisRegistry(client).rollout(w.MODEL, w.VERSION)
        await client.aclose()
        return done.current.epoch

    return asyncio.run(go())


class TestCli:
    def test_report_reads_the_findings_file_and_writes_html(self, tmp_path):
        j = FileJournal(tmp_path / "f.jsonl")
        j.append(finding(1, kind="corrupt"))
        j.save_result("timing", TIMING)
        out = tmp_path / "r.html"
        res = runner.invoke(app, ["audit", "report", "--findings", str(j.path), "--format",
                                  "html", "-o", str(out)])
        assert res.exit_code == 0, res.output
        assert "corrupt" in out.read_text()

    def test_report_since_drops_older_findings(self, tmp_path):
        j = FileJournal(tmp_path / "f.jsonl")
        j.append(finding(1, at=100.0))
        j.append(finding(2, at=200.0))
        res = runner.invoke(app, ["audit", "report", "--findings", str(j.path), "--format",
                                  "json", "--since", "150"])
        assert res.exit_code == 0, res.output
        assert [f["summary"] for f in json.loads(res.stdout)["findings"]] == ["finding 2"]

    def test_a_bad_format_is_refused_naming_the_choices(self, tmp_path):
        res = runner.invoke(app, ["audit", "report", "--findings", str(tmp_path / "f"),
                                  "--format", "pdf"])
        assert res.exit_code == 2 and "json, md, html" in res.output

    def test_a_bad_since_says_what_is_accepted(self, tmp_path):
        res = runner.invoke(app, ["audit", "report", "--findings", str(tmp_path / "f"),
                                  "--since", "yesterday"])
        assert res.exit_code == 2 and "24h" in res.output

    def test_scan_without_redis_explains_why_it_cannot_reach_the_embedded_store(self, tmp_path):
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'state_dir = "{tmp_path}"\n')
        res = runner.invoke(app, ["audit", "scan", "--config", str(cfg)])
        assert res.exit_code == 2 and "[redis] url" in res.output

    @pytest.mark.redis
    def test_scan_exits_non_zero_on_planted_faults_and_stores_its_result(self, redis_url, tmp_path):
        epoch = rollout(redis_url)

        async def plant():
            s = open_store(redis_url)
            for key, raw, _ in w.clean_entries(5, epoch=epoch):
                await s.set(key, raw)
            for p in w.plant_faults(5, epoch=epoch):
                await s.set(w.skey(w.key_for(p.tenant, p.index, epoch=epoch)), p.raw)
            await s.close()

        asyncio.run(plant())
        cfg = tmp_path / "c.toml"
        cfg.write_text(
            f'state_dir = "{tmp_path}"\n[redis]\nurl = "{redis_url}"\n'
            # the world keys with keying's default secret; the scan must know it to recompute
            # material digests
            f'[cache]\nsecret = "{DEFAULT_MATERIAL_SECRET.decode()}"\n'
            '[[tenants]]\nid = "globex"\napi_keys = ["globex-key-0123456789"]\n'
            f'canaries = ["{w.CANARIES["globex"][0]}"]\n')
        findings = tmp_path / "f.jsonl"
        res = runner.invoke(app, ["audit", "scan", "--config", str(cfg), "--findings",
                                  str(findings), "--quiet"])
        assert res.exit_code == 1, res.output
        stored = FileJournal(findings)
        saved = stored.load_result("scan")
        assert f"scan {saved['run_id']}: 16 entries" in res.output
        assert saved["entries"] == 16 and saved["target"] == redis_url
        assert "{" not in res.output.splitlines()[-1]  # counts as words, not a Python repr
        assert {f.kind for f in stored.findings()} >= {"cross_scope", "stale", "corrupt", "canary",
                                                        "collision"}
        assert any(f.summary.startswith("material digest") for f in stored.findings())

    @pytest.mark.redis
    def test_scan_of_a_clean_store_exits_zero(self, redis_url, tmp_path):
        epoch = rollout(redis_url)

        async def plant():
            s = open_store(redis_url)
            for key, raw, _ in w.clean_entries(5, epoch=epoch):
                await s.set(key, raw)
            await s.close()

        asyncio.run(plant())
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'state_dir = "{tmp_path}"\n[redis]\nurl = "{redis_url}"\n'
                       f'[cache]\nsecret = "{DEFAULT_MATERIAL_SECRET.decode()}"\n')
        res = runner.invoke(app, ["audit", "scan", "--config", str(cfg), "--findings",
                                  str(tmp_path / "f.jsonl"), "--quiet"])
        assert res.exit_code == 0, res.output


class TestScanRecompute:
    """End to end: the service fills Redis through the reference engine (entries carry their
    key material), one answer is then forged in place, and `cachesvc audit scan --recompute`
    reads each request back out of its entry, recomputes it with the engine, and finds exactly
    the forged one."""

    @pytest.mark.redis
    def test_scan_recompute_finds_the_one_wrong_answer_among_real_fills(self, redis_url, tmp_path,
                                                                        tiny_engine):
        from fastapi.testclient import TestClient

        from cachesvc.app import create_app
        from cachesvc.upstream import EngineUpstream
        from tests.service_helpers import auth, make_settings

        secret = "scan-secret-0123456789abcdef"
        settings = make_settings(tmp_path, redis={"url": redis_url}, cache={"secret": secret},
                                 upstream={"model": "random-tiny"})
        bodies = [{"model": "random-tiny", "temperature": 0, "max_tokens": 6,
                   "messages": [{"role": "user", "content": f"question {i}"}]} for i in range(3)]
        bodies.append({"model": "random-tiny", "prompt": "complete me", "max_tokens": 5,
                       "temperature": 0, "stop": ["\n"]})
        with TestClient(create_app(settings, upstream=EngineUpstream(tiny_engine))) as c:
            for b in bodies:
                path = "/v1/completions" if "prompt" in b else "/v1/chat/completions"
                r = c.post(path, json=b, headers=auth())
                assert r.status_code == 200 and r.headers["x-cache"].startswith("MISS"), r.text

        # A wrong answer the service itself wrote (a model fault, not a forgery): it carries a
        # valid MAC, so only the recompute can find it.
        keys = EntryKeys(secret.encode())

        async def forge() -> str:
            s = open_store(redis_url)
            entries = [(k, decode_entry(raw, keys=keys)) async for k, raw in s.scan_entries()]
            assert len(entries) == len(bodies) and all(e.material for _, e in entries)
            key, entry = next(
                (k, e) for k, e in entries if e.response["object"] == "chat.completion")
            wrong = dict(entry.response, choices=[{**entry.response["choices"][0], "message": {
                "role": "assistant", "content": "a fluent but wrong answer"}}])
            await s.set(key, encode_entry(dataclasses.replace(entry, response=wrong), keys=keys))
            await s.close()
            return key

        forged = asyncio.run(forge())
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'state_dir = "{tmp_path}"\n[redis]\nurl = "{redis_url}"\n'
                       f'[cache]\nsecret = "{secret}"\n[upstream]\nmodel = "random-tiny"\n'
                       'device = "cpu"\n')
        findings = tmp_path / "f.jsonl"
        args = ["audit", "scan", "--config", str(cfg), "--findings", str(findings), "--quiet"]
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output  # without --recompute the forgery is invisible
        res = runner.invoke(app, [*args, "--recompute", "--oracle", "engine"])
        assert res.exit_code == 1, res.output
        (found,) = FileJournal(findings).findings()
        assert (found.kind, found.entry.storage_key) == ("mismatch", forged)
        assert found.evidence["check"] == "exact"
        result = FileJournal(findings).load_result("scan")
        assert result["recomputed"] == {"pass": len(bodies) - 1, "finding": 1}
        assert result["material_digest_checked"] is True
