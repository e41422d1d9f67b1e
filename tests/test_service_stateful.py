"""The service against a plain model of what it may answer, driven by hypothesis.

Tenants send a small set of requests (plain or streamed), admins roll the model out and delete
a tenant's entries, in any order. After every request: the answer is the right one for that
request, and it is a HIT exactly when the model says an entry from this tenant and this model
epoch exists. A wrong hit anywhere fails the run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import orjson
from fastapi.testclient import TestClient
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cachesvc.app import create_app
from tests.service_helpers import ADMIN, KEY_A, KEY_B, auth, make_settings
from tests.support.echo_upstream import EchoUpstream

TENANTS = {"team-a": KEY_A, "team-b": KEY_B}
BODIES = [{"model": "echo-1", "messages": [{"role": "user", "content": f"q{i}"}],
           "temperature": 0} for i in range(4)] + [
    {"model": "echo-1", "messages": [{"role": "user", "content": "q0"}], "temperature": 0,
     "max_tokens": 5}]
EXPECTED = [EchoUpstream()._parts(b)[2] for b in BODIES]


def _content(resp: Any, stream: bool) -> str:
    if not stream:
        return resp.json()["choices"][0]["message"]["content"]
    text = ""
    for line in resp.text.splitlines():
        if line.startswith("data: {"):
            chunk = orjson.loads(line[6:])
            for ch in chunk.get("choices") or ():
                text += ch.get("delta", {}).get("content") or ""
    return text


class ServiceMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="cachesvc-stateful-"))
        self.client = TestClient(create_app(make_settings(self.tmp), upstream=EchoUpstream()))
        self.client.__enter__()
        self.epoch = 0  # the model's rollouts so far
        self.cached: set[tuple[str, int, int]] = set()

    def teardown(self) -> None:
        self.client.__exit__(None, None, None)

    @rule(tenant=st.sampled_from(sorted(TENANTS)), i=st.integers(0, len(BODIES) - 1),
          stream=st.booleans())
    def request(self, tenant: str, i: int, stream: bool) -> None:
        body = {**BODIES[i], "stream": stream}
        r = self.client.post("/v1/chat/completions", json=body, headers=auth(TENANTS[tenant]))
        assert r.status_code == 200
        assert _content(r, stream) == EXPECTED[i], "an answer for another request"
        expect_hit = (tenant, i, self.epoch) in self.cached
        assert r.headers["x-cache"] == ("HIT" if expect_hit else "MISS")
        self.cached.add((tenant, i, self.epoch))

    @rule()
    def rollout(self) -> None:
        self.epoch += 1
        r = self.client.post("/admin/models/echo-1/rollout",
                             json={"version": f"v{self.epoch}", "create": True},
                             headers=auth(ADMIN))
        assert r.status_code == 200

    @rule(tenant=st.sampled_from(sorted(TENANTS)))
    def delete_tenant(self, tenant: str) -> None:
        r = self.client.delete(f"/admin/tenants/{tenant}/entries", headers=auth(ADMIN))
        assert r.status_code == 200
        self.cached = {c for c in self.cached if c[0] != tenant}

    @invariant()
    def flights_are_clean(self) -> None:
        services = self.client.app.state.services
        services.flights.check_valid()
        assert len(services.flights) == 0
        services.cache.guard.breaker.check_valid()


TestServiceAgainstModel = ServiceMachine.TestCase
TestServiceAgainstModel.settings = settings(max_examples=25, stateful_step_count=25,
                                            deadline=None)
