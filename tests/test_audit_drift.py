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
            # layer 1 is singled out: INT8 goes off for it alone
            assert saved["int8_disabled"] is False and saved["int8_full_layers"] == [1]
            assert saved["action"] == "layers:1" and saved["kld_mean"] == report.overall.kld_mean
            data = build_report(journal.findings(), scan=None, timing=None, since=None,
                                generated_at=0.0,
                                drift=saved)
            assert data["verdict"] == "findings" and data["summary"]["by_kind"]["drift"] == 1
            md = render(data, "md")
            assert "INT8 turned off for layers 1" in md and "| 0-128 | 128 |" in md
            assert "Last INT8 KV drift audit" in render(data, "html")
            after = generate_latest(engine_registry(engine)).decode()
            assert metric(after, "engine_kv_int8") == 1 and metric(
                after, "engine_kv_int8_disabled") == 0
            assert metric(after, "engine_kv_int8_full_layers") == 1
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


class TestBackgroundDrift:
    def test_a_sampler_trip_becomes_a_drift_finding_and_shows_in_the_metrics(
        self, make_engine, journal):
        from audit.drift import trip_recorder
        from gpu_prefix.drift_sampler import DriftSamplerConfig
        from gpu_prefix.engine import GenerationParams

        engine = make_engine(kv_dtype="int8", pool_bytes=2**21,
                             drift_sampling=DriftSamplerConfig(rate=1.0, tokens_per_minute=10**6,
                                                               busy_wait_s=0.05))
        recorder = Recorder(journal)
        try:
            engine.drift_sampler.on_trip = trip_recorder(recorder, engine)
            plant(engine, zero_k=frozenset({0}))
            for prompt in corpus(engine, prompts=2, seed=0):
                engine.generate(prompt, GenerationParams(max_tokens=200, min_tokens=200))
            assert engine.drift_sampler.wait_drained(60)
            recorder.flush()
            [finding] = journal.findings()
            assert finding.kind == "drift" and finding.evidence["via"] == "sampler"
            assert finding.evidence["int8_off"] == "layers:0"
            assert finding.evidence["worst_layer"] == 0
            assert "background sampler" in finding.summary and "for layers 0" in finding.summary
            text = generate_latest(engine_registry(engine)).decode()
            assert metric(text, "engine_kv_drift_sample_trips_total") == 1
            assert metric(text, "engine_kv_drift_sampled_total") >= 1
            assert 'engine_kv_drift_sample_skipped_total{reason="budget"} 0.0' in text
            assert 'engine_kv_drift_sample_kld_mean{positions="0-128"}' in text
            assert metric(text, "engine_kv_int8") == 1 and metric(
                text, "engine_kv_int8_full_layers") == 1
        finally:
            recorder.close()
            engine.close()

    def test_the_periodic_drift_audit_runs_at_start_when_configured_and_not_by_default(
        self, make_engine, journal,
                                                                                      tmp_path):
        import asyncio
        import contextlib

        from cachesvc.wiring import drift_sampling, watch_drift
        from tests.service_helpers import make_settings

        assert make_settings(tmp_path).engine.drift_audit_every_h == 0
        settings = make_settings(tmp_path, engine={"kv_dtype": "int8", "drift_audit_every_h": 24,
                                                   "drift_audit_prompts": 1,
                                                   "drift_audit_max_tokens": 160,
                                                   "drift_sample_rate": 0.25})
        assert drift_sampling(settings).rate == 0.25
        engine = make_engine(kv_dtype="int8", pool_bytes=2**21)
        plant(engine, zero_v=frozenset({1}))
        recorder = Recorder(journal)

        async def serve() -> None:
            async with contextlib.AsyncExitStack() as stack:
                watch_drift(settings, engine, recorder, stack)
                for _ in range(600):
                    if engine.last_drift is not None:
                        break
                    await asyncio.sleep(0.1)

        try:
            asyncio.run(serve())
            assert engine.last_drift is not None and engine.last_drift.action == "layers:1"
            recorder.flush()
            [finding] = journal.findings()
            assert finding.evidence["via"] == "audit" and journal.load_result(
                "drift")["action"] == "layers:1"
        finally:
            recorder.close()
            engine.close()
