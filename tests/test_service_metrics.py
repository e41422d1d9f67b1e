"""Metrics an operator reads: counters that agree with each other, a hit ratio per tenant and
model, client errors apart from upstream failures, the store's size, and /healthz|/readyz
wording that says what it means."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from cachesvc.app import create_app
from tests.service_helpers import ADMIN, KEY_B, auth, chat, make_settings
from tests.support.echo_upstream import EchoUpstream


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def client(tmp_path: Any) -> Any:
    with TestClient(create_app(make_settings(tmp_path), upstream=EchoUpstream())) as c:
        yield c


class TestCounters:
    def test_hits_and_misses_per_tenant_and_model_add_up_to_the_lookups(self, client):
        names = [("cachesvc_lookups_total", {"outcome": o, "route": "proxy"})
                 for o in ("hit", "miss")]
        start = [value(n, **lb) for n, lb in names]
        hits0 = value("cachesvc_hits_total", tenant="team-b", model="echo-1")
        misses0 = value("cachesvc_misses_total", tenant="team-b", model="echo-1")
        body = chat("ratio")
        for _ in range(4):
            client.post("/v1/chat/completions", json=body, headers=auth(KEY_B))
        # An only-if-cached miss is answered 504, and is still a miss in every counter.
        r = client.post("/v1/chat/completions", json=chat("never seen"), headers={
            **auth(KEY_B), "Cache-Control": "only-if-cached"})
        assert r.status_code == 504
        hits = value("cachesvc_hits_total", tenant="team-b", model="echo-1") - hits0
        misses = value("cachesvc_misses_total", tenant="team-b", model="echo-1") - misses0
        assert (hits, misses) == (3, 2)
        d_hit, d_miss = (value(n, **lb) - s for (n, lb), s in zip(names, start, strict=True))
        assert (d_hit, d_miss) == (hits, misses)

    def test_a_client_error_from_the_upstream_is_not_an_upstream_failure(self, client):
        fail0 = value("cachesvc_upstream_errors_total", status="429")
        refused0 = value("cachesvc_upstream_refusals_total", status="429")
        err0 = value("cachesvc_upstream_errors_total", status="503")
        client.post("/v1/chat/completions", json=chat(metadata={"fail": "429"}), headers=auth())
        client.post("/v1/chat/completions", json=chat(metadata={"fail": "503"}), headers=auth())
        assert value("cachesvc_upstream_refusals_total", status="429") == refused0 + 1
        assert value("cachesvc_upstream_errors_total", status="429") == fail0
        assert value("cachesvc_upstream_errors_total", status="503") == err0 + 1

    def test_the_embedded_stores_size_and_entries_are_exported(self, client):
        client.post("/v1/chat/completions", json=chat("size me"), headers=auth())
        text = client.get("/metrics", headers=auth(ADMIN)).text
        entries = value("cachesvc_store_entries")
        assert entries >= 1 and value("cachesvc_store_bytes") > 0
        assert "cachesvc_store_max_bytes" in text


class TestHealth:
    def test_liveness_says_nothing_about_the_store(self, client):
        assert client.get("/healthz").json() == {"status": "ok", "detail": {}}

    def test_readiness_names_the_store_state_in_words_and_the_breaker_apart(self, client):
        body = client.get("/readyz").json()
        assert body["store"] == "available" and body["breaker"] == "closed"
