"""The INT8 drift audit end to end: a planted bad quantization is recorded as a ``drift``
finding with its evidence, shows in the audit report and in the engine's metrics; a clean run
records nothing; ``cachesvc audit drift`` runs the corpus and says so."""

from __future__ import annotations

import json

import pytest
from prometheus_client import generate_latest
from typer.testing import CliRunner

from audit.drift import run_drift_audit
from audit.journal import FileJournal
from audit.recorder import Recorder
from audit.report import build_report, render
from cachesvc.cli import app
from cachesvc.engine_metrics import engine_registry
from gpu_prefix.drift import corpus
from tests.test_gpu_prefix_drift import plant


@pytest.fixture
def journal(tmp_path):
    return FileJournal(tmp_path / "findings.jsonl")


def metric(text: str, name: str) -> float:
    return float(
        next(line for line in text.splitlines() if line.startswith(name + " ")).split()[-1])


class TestDriftAudit:
    def test_a_planted_fault_becomes_a_drift_finding_in_the_journal_report_and_metrics(
        self, make_engine, journal):
        engine = make_engine(kv_dtype="int8", pool_bytes=2**21)
        try:
            plant(engine, zero_v=frozenset({1}))
            before = generate_latest(engine_registry(engine)).decode()
            assert metric(before, "engine_kv_int8") == 1 and metric(
                before, "engine_kv_int8_disabled") == 0
            recorder = Recorder(journal)
            report = run_drift_audit(engine, corpus(engine, prompts=1, seed=0), max_tokens=160,
                                     recorder=recorder, journal=journal)
            recorder.close()
            [finding] = journal.findings()
            assert finding.kind == "drift" and finding.source == "drift"
            assert finding.entry.model == "random-tiny" and finding.entry.epoch == 1
            assert finding.evidence["worst_layer"] == 1
            assert finding.evidence["exceeded"] == report.exceeded
            saved = journal.load_result("drift")
            assert saved["int8_disabled"] is True and saved["kld_mean"] == report.overall.kld_mean
            data = build_report(journal.findings(), scan=None, timing=None, since=None,
                                generated_at=0.0,
                                drift=saved)
            assert data["verdict"] == "findings" and data["summary"]["by_kind"]["drift"] == 1
            md = render(data, "md")
            assert "INT8 turned off" in md and "| 0-128 | 128 |" in md
            assert "Last INT8 KV drift audit" in render(data, "html")
            after = generate_latest(engine_registry(engine)).decode()
            assert metric(after, "engine_kv_int8") == 0 and metric(
                after, "engine_kv_int8_disabled") == 1
            assert 'engine_kv_drift_kld_mean{positions="all"}' in after
        finally:
            engine.close()

    def test_a_clean_run_records_no_finding_and_keeps_int8(self, make_engine, journal):
        engine = make_engine(kv_dtype="int8", pool_bytes=2**21)
        try:
            recorder = Recorder(journal)
            report = run_drift_audit(engine, corpus(engine, prompts=1, seed=0), max_tokens=160,
                                     recorder=recorder,
                                     journal=journal, per_layer=False)
            recorder.close()
            assert report.exceeded == [] and journal.findings() == []
            assert journal.load_result("drift")["int8_disabled"] is False
            assert engine.kv_dtype == "int8"
        finally:
            engine.close()


class TestDriftCli:
    def test_audit_drift_prints_the_report_as_json_and_exits_0_when_within_thresholds(
        self, tmp_path):
        out = CliRunner().invoke(app, ["audit", "drift", "--model", "random-tiny", "--prompts", "1",
                                       "--max-tokens", "40", "--no-per-layer", "--json",
                                       "--findings", str(tmp_path / "f.jsonl")])
        assert out.exit_code == 0, out.output
        line = next(line for line in out.output.splitlines() if line.startswith("{"))
        data = json.loads(line)
        assert data["max_tokens"] == 40 and data["tokens"] == 40 and data["exceeded"] == []
        assert set(data["buckets"]) == {"0-128", "128-512", "512+"}
