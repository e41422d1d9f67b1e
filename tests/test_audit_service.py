"""The shadow auditor inside the running service, with the reference engine as upstream and
oracle: clean traffic yields no finding; a wrong answer forged under a valid key and another
tenant's canary are found from the hits that serve them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import httpx
import pytest

from audit import FileJournal
from cachesvc.app import create_app
from cachesvc.store import decode_entry, encode_entry, open_store
from cachesvc.upstream import EngineUpstream
from tests.service_helpers import KEY_A, KEY_B, auth, make_settings, serving
from tests.store_helpers import KEYS


@pytest.fixture(scope="module")
def tiny_engine(tiny_model):
    from gpu_prefix.engine import Engine

    return Engine(tiny_model)  # one engine per module: its pool is warm across the tests


def chat(content: str) -> dict:
    return {"model": "random-tiny", "temperature": 0, "max_tokens": 8,
            "messages": [{"role": "user", "content": content}]}


@contextlib.contextmanager
def _running(tmp_path, engine, **audit):
    findings = tmp_path / "findings.jsonl"
    settings = make_settings(tmp_path, upstream={"model": "random-tiny"},
                             audit={**audit, "findings_path": str(findings)})
    store = open_store(None)
    app = create_app(settings, upstream=EngineUpstream(engine), store=store)
    with serving(app) as server:
        yield server, app, store, FileJournal(findings)


@pytest.fixture
def service(tmp_path, tiny_engine):
    with _running(tmp_path, tiny_engine, sample_rate=1.0, fill_sample_rate=1.0,
                  oracle="engine") as running:
        yield running


def auditor_of(app):
    return app.state.services.cache.observers[0].auditor


def post(server, body, key=KEY_A):
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=auth(key), timeout=60)
    assert r.status_code == 200, r.text
    return r




class TestShadowAuditorInTheService:
    def test_clean_misses_and_hits_are_recomputed_and_pass(self, service):
        server, app, _, journal = service
        for i in range(4):
            assert post(server, chat(f"clean {i}")).headers["x-cache"].startswith("MISS")
            assert post(server, chat(f"clean {i}")).headers["x-cache"].startswith("HIT")
        auditor = auditor_of(app)
        auditor.drain(timeout=60)
        assert auditor.checked == 8  # four fills and four hits
        assert journal.findings() == []

    def test_a_wrong_answer_under_a_valid_key_is_found_from_the_hit(self, service):
        server, app, store, journal = service
        post(server, chat("what is two plus two"))
        key, raw = asyncio.run(_entries(store))[0]
        entry = decode_entry(raw, keys=KEYS)
        body = dict(entry.response)
        body["choices"] = [{**body["choices"][0],
                            "message": {"role": "assistant", "content": "five, certainly"}}]
        forged = encode_entry(dataclasses.replace(entry, response=body), keys=KEYS)
        asyncio.run(store.set(key, forged, ttl=600))
        r = post(server, chat("what is two plus two"))
        assert r.headers["x-cache"].startswith("HIT")  # provenance is valid: the service serves it
        assert r.json()["choices"][0]["message"]["content"] == "five, certainly"
        auditor_of(app).drain(timeout=60)
        found = journal.findings()
        assert [f.kind for f in found] == ["mismatch"]
        assert found[0].entry.storage_key == key and found[0].source == "hit"

    def test_another_tenants_canary_in_a_served_answer_is_found(self, service):
        server, app, store, journal = service
        post(server, chat("tell me a secret"), key=KEY_B)
        key, raw = asyncio.run(_entries(store))[0]
        entry = decode_entry(raw, keys=KEYS)
        body = dict(entry.response)
        body["choices"] = [{**body["choices"][0],
                            "message": {"role": "assistant", "content": "psst: CANARY-A-7f3"}}]
        asyncio.run(store.set(key,
                              encode_entry(dataclasses.replace(entry, response=body), keys=KEYS),
                              ttl=600))
        post(server, chat("tell me a secret"), key=KEY_B)
        auditor_of(app).drain(timeout=60)
        kinds = sorted(f.kind for f in journal.findings())
        assert "canary" in kinds
        canary = next(f for f in journal.findings() if f.kind == "canary")
        assert canary.evidence["canary_tenant"] == "team-a"
        assert "CANARY-A-7f3" not in repr(canary.as_dict())


async def _entries(store):
    return [(k, raw) async for k, raw in store.scan_entries()]


@pytest.fixture
def unsampled_service(tmp_path, tiny_engine):
    """Sampling off: only refusals reach the auditor."""
    with _running(tmp_path, tiny_engine, sample_rate=0.0, fill_sample_rate=0.0,
                  oracle="none") as running:
        yield running


class TestRefusedEntriesAreFindings:
    def test_a_corrupt_entry_is_a_miss_plus_a_durable_finding_at_any_sample_rate(
        self, unsampled_service
    ):
        server, app, store, journal = unsampled_service
        post(server, chat("flip me"))
        key, raw = asyncio.run(_entries(store))[0]
        damaged = bytearray(raw)
        damaged[-3] ^= 0x01
        asyncio.run(store.set(key, bytes(damaged), ttl=600))
        r = post(server, chat("flip me"))
        assert r.headers["x-cache"].startswith("MISS")
        auditor_of(app).drain(timeout=60)
        found = journal.findings()
        assert [f.kind for f in found] == ["corrupt"]
        assert found[0].entry.storage_key == key

    def test_another_scopes_entry_under_this_key_is_refused_and_reported(
        self, unsampled_service
    ):
        server, app, store, journal = unsampled_service
        post(server, chat("mine"), key=KEY_A)
        post(server, chat("theirs"), key=KEY_B)
        entries = asyncio.run(_entries(store))
        a_key = next(
            k for k, raw in entries if decode_entry(raw, keys=KEYS).scope.tenant == "team-a")
        b_raw = next(
            raw for k, raw in entries if decode_entry(raw, keys=KEYS).scope.tenant != "team-a")
        asyncio.run(store.set(a_key, b_raw, ttl=600))  # tenant B's entry planted under A's key
        r = post(server, chat("mine"), key=KEY_A)
        assert r.headers["x-cache"].startswith("MISS")
        auditor_of(app).drain(timeout=60)
        kinds = [f.kind for f in journal.findings()]
        assert kinds and set(kinds) <= {"cross_scope", "collision"}


class TestSamplingOnTheHotPath:
    def test_skipped_hits_are_counted_down_by_the_cache_without_calling_the_auditor(
            self, tmp_path, tiny_engine):
        """At 10% the auditor is asked about roughly one hit in five (the sample, and the
        draw after it): the cache counts down the gaps it was promised. The hits are still
        counted as offered (a gap when it closes), and about a tenth are checked."""
        with _running(tmp_path, tiny_engine, sample_rate=0.1, fill_sample_rate=0.0,
                      oracle="none") as (server, app, _, journal):
            post(server, chat("counted down"))  # the fill
            observer = app.state.services.cache.observers[0]
            auditor = observer.auditor
            calls = []
            draw = observer.wants
            observer.wants = lambda kind: calls.append(kind) or draw(kind)
            offered = auditor.offered
            with httpx.Client(base_url=server.url, headers=auth(KEY_A), timeout=60) as client:
                for _ in range(600):
                    r = client.post("/v1/chat/completions", json=chat("counted down"))
                    assert r.headers["x-cache"].startswith("HIT")
            auditor.drain(timeout=60)
            # Counted when the sample after a gap is drawn: the last gap may be open.
            assert 500 <= auditor.offered - offered <= 600
            assert 25 <= auditor.enqueued <= 100  # Binomial(600, 0.1): 60, sd 7.3
            assert len(calls) <= 2 * auditor.enqueued + 2 < 600 / 3
            assert journal.findings() == []
            auditor.check_valid()
