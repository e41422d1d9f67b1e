"""The timing audit: the protocol and its statistics against a simulated target, and (slow) the
real engine over HTTP with tenant isolation on and off."""

from __future__ import annotations

import random

import pytest

from audit import AuditConfigError, TimingConfig, levels_for_keys, run_timing
from audit.timing import ks_greater
from tests.service_helpers import serving


class SimulatedTarget:
    """A server with a prefix cache: time grows with the words not already cached for the
    caller's partition. ``shared`` puts every key in one partition (the leak)."""

    def __init__(self, *, tenants: dict[str, str], shared: bool, seed: int = 0):
        self.tenants = tenants
        self.shared = shared
        self.cache: dict[str, set[tuple[str, ...]]] = {}
        self.rng = random.Random(seed)
        self.calls = 0

    def __call__(self, *, key: str, prompt: str, user: str | None = None) -> float:
        self.calls += 1
        part = "all" if self.shared else f"{self.tenants[key]}/{user}"
        words = tuple(prompt.split())
        seen = self.cache.setdefault(part, set())
        cached = 0
        for n in range(len(words), 0, -1):
            if words[:n] in seen:
                cached = n
                break
        for n in range(1, len(words) + 1):
            seen.add(words[:n])
        return 0.010 + 0.0001 * (len(words) - cached) + self.rng.gauss(0, 0.002)


KEYS = {"ka": "acme", "ka2": "acme", "kb": "globex"}


class TestProtocol:
    def test_a_shared_cache_is_flagged_as_a_cross_tenant_leak(self):
        target = SimulatedTarget(tenants=KEYS, shared=True)
        result = run_timing(levels_for_keys(key_a="ka", key_b="kb", key_a2="ka2"), target,
                            target="sim", config=TimingConfig(trials=40, prompt_words=100),
                            rng=random.Random(1))
        by = {lv.name: lv for lv in result.levels}
        assert by["other_tenant"].leak and by["other_tenant"].p_value < 1e-4
        assert by["same_key"].shared and not by["same_key"].leak
        assert [f.kind for f in result.findings(at=0.0)] == ["timing"]

    def test_an_isolated_cache_passes_and_the_control_still_shows_the_effect(self):
        target = SimulatedTarget(tenants=KEYS, shared=False)
        result = run_timing(levels_for_keys(key_a="ka", key_b="kb", key_a2="ka2"), target,
                            target="sim", config=TimingConfig(trials=40, prompt_words=100),
                            rng=random.Random(2))
        by = {lv.name: lv for lv in result.levels}
        assert by["same_key"].shared  # positive control: the cache works
        assert by["same_tenant"].shared and not by["same_tenant"].leak  # tenant scope shares
        assert not by["other_tenant"].shared and by["other_tenant"].verdict == "isolated"
        assert result.findings(at=0.0) == []

    def test_without_a_cache_effect_the_isolated_verdict_is_inconclusive(self):
        def flat(*, key: str, prompt: str, user: str | None = None) -> float:
            return 0.01 + random.random() * 0.001

        result = run_timing(levels_for_keys(key_a="ka", key_b="kb"), flat, target="flat",
                            config=TimingConfig(trials=20, prompt_words=20),
                            rng=random.Random(3))
        other = next(lv for lv in result.levels if lv.name == "other_tenant")
        assert other.verdict.startswith("inconclusive")
        assert result.notes

    def test_trials_are_interleaved_and_every_request_is_sent(self):
        target = SimulatedTarget(tenants=KEYS, shared=False)
        cfg = TimingConfig(trials=10, prompt_words=20, warmup=1)
        run_timing(levels_for_keys(key_a="ka", key_b="kb"), target, target="sim", config=cfg,
                   rng=random.Random(4))
        # warmup (1 per level) + per level and trial: victim+probe for hit and for miss.
        assert target.calls == 2 * 1 + 2 * 10 * 4

    def test_too_few_trials_are_refused_naming_the_option(self):
        with pytest.raises(AuditConfigError, match="--trials"):
            TimingConfig(trials=2)

    def test_the_ks_test_is_one_sided(self):
        fast, slow = [0.1] * 30, [0.2] * 30
        assert ks_greater(fast, slow)[1] < 1e-6
        assert ks_greater(slow, fast)[1] > 0.5


class TestPerUserTenants:
    def test_a_prefix_cache_shared_between_users_of_a_per_user_tenant_is_a_leak(self):
        # One partition per key's tenant: the users of "acme" share one cache (the leak).
        target = SimulatedTarget(tenants=KEYS, shared=False)
        target_shared_users = lambda *, key, prompt, user=None: target(  # noqa: E731
            key=key, prompt=prompt, user=None)
        levels = levels_for_keys(key_a="ka", key_b="kb", user="alice", other_user="bob")
        result = run_timing(levels, target_shared_users, target="sim",
                            config=TimingConfig(trials=40, prompt_words=100),
                            rng=random.Random(3))
        by = {lv.name: lv for lv in result.levels}
        assert by["other_user"].leak and not by["other_tenant"].shared
        assert result.user_scoped and [f.evidence["level"] for f in
                                       result.findings(at=0.0)] == ["other_user"]

    def test_users_kept_apart_pass(self):
        target = SimulatedTarget(tenants=KEYS, shared=False)
        levels = levels_for_keys(key_a="ka", user="alice", other_user="bob")
        result = run_timing(levels, target, target="sim",
                            config=TimingConfig(trials=40, prompt_words=100),
                            rng=random.Random(4))
        by = {lv.name: lv for lv in result.levels}
        assert by["same_key"].shared and by["other_user"].verdict == "isolated"

    def test_another_user_needs_the_victims_user(self):
        with pytest.raises(AuditConfigError, match="--other-user"):
            levels_for_keys(key_a="ka", other_user="bob")


class TestPartialResults:
    def test_checkpoints_carry_every_level_so_far_and_the_final_result_is_complete(self):
        clock = iter(range(10_000)).__next__  # one second per call: a checkpoint every round
        seen = []
        target = SimulatedTarget(tenants=KEYS, shared=False)
        result = run_timing(levels_for_keys(key_a="ka", key_b="kb"), target, target="sim",
                            config=TimingConfig(trials=6, prompt_words=50, warmup=0),
                            rng=random.Random(5), clock=lambda: float(clock()),
                            checkpoint=seen.append, checkpoint_every_s=1.0, run_id="r1")
        assert seen and all(p.status == "running" and p.run_id == "r1" for p in seen)
        done = [len(p.levels[0].hit_times) for p in seen]
        assert done == sorted(done) and done[0] >= 1 and done[-1] <= 6
        assert {lv.name for lv in seen[0].levels} == {"same_key", "other_tenant"}
        assert result.status == "complete" and result.run_id == "r1"

    def test_a_stopped_cli_run_saves_what_it_had_as_interrupted(self, tmp_path, monkeypatch):
        from typer.testing import CliRunner

        from audit import FileJournal
        from cachesvc.cli import app

        calls = {"n": 0}

        def prober(*, key, prompt, user=None):
            calls["n"] += 1
            if calls["n"] > 120:
                raise KeyboardInterrupt
            return 0.01

        class FakeProber:
            def __init__(self, *a, **kw):
                pass

            __call__ = staticmethod(prober)

            def close(self):
                pass

        from cachesvc.cli import audit as audit_cli

        monkeypatch.setattr("cachesvc.auditing.HttpProber", FakeProber)
        real = audit_cli.run_timing  # checkpoint every round instead of every 10 s
        monkeypatch.setattr(audit_cli, "run_timing",
                            lambda *a, **kw: real(*a, **{**kw, "checkpoint_every_s": 0.0}))
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'state_dir = "{tmp_path}"\n')
        res = CliRunner().invoke(app, [
            "audit", "timing", "--url", "http://sim", "--model", "m", "--victim-key", "ka",
            "--probe-key-other-tenant", "kb", "--trials", "50", "--config", str(cfg),
            "--findings", str(tmp_path / "f.jsonl")])
        assert res.exit_code == 130, res.output
        saved = FileJournal(tmp_path / "f.jsonl").load_result("timing")
        assert saved["status"] == "interrupted" and 0 < saved["levels"][0]["trials"] < 50
        assert "results so far are saved" in res.output


class TestProbes:
    def test_probes_ask_the_service_not_to_store_them_and_carry_the_user(self):
        import httpx

        from cachesvc.auditing import HttpProber

        sent = []

        def handler(request: httpx.Request) -> httpx.Response:
            sent.append(request)
            return httpx.Response(200, json={})

        prober = HttpProber("http://svc", model="m",
                            client=httpx.Client(transport=httpx.MockTransport(handler)))
        prober(key="k", prompt="a b c", user="alice")
        prober(key="k", prompt="a b c")
        assert all(r.headers["cache-control"] == "no-store" for r in sent)
        import json

        bodies = [json.loads(r.content) for r in sent]
        assert bodies[0]["user"] == "alice" and "user" not in bodies[1]


# -- the real engine over HTTP -------------------------------------------------------------

KEY_A, KEY_A2, KEY_B = "key-acme-0123456789", "key-acme-second-0123", "key-globex-012345678"


@pytest.fixture(scope="module")
def tiny_engine(tiny_model):
    from gpu_prefix.engine import Engine

    return Engine(tiny_model, pool_bytes=512 * 2**20)


def _engine_timing(engine, *, isolate: bool, trials: int, same_tenant: bool = True):
    from cachesvc.auditing import HttpProber
    from cachesvc.engine_app import create_engine_app

    engine.isolate_tenants = isolate
    app = create_engine_app(engine, api_keys={KEY_A: "acme", KEY_A2: "acme", KEY_B: "globex"})
    with serving(app) as server:
        url = server.url
        prober = HttpProber(url, model=engine.model_id)
        try:
            levels = levels_for_keys(key_a=KEY_A, key_b=KEY_B,
                                     key_a2=KEY_A2 if same_tenant else None)
            return run_timing(levels, prober,
                              target=url,
                              # alpha 1e-3: enough power at 24 trials on a loaded 2-core machine;
                              # the isolated engine's p-values sit near 0.5.
                              config=TimingConfig(trials=trials, prompt_words=300, alpha=1e-3),
                              rng=random.Random(11))
        finally:
            prober.close()


@pytest.mark.slow
class TestAgainstTheEngine:
    def test_the_engine_with_isolation_off_is_flagged_as_leaking(self, tiny_engine):
        result = _engine_timing(tiny_engine, isolate=False, trials=24, same_tenant=False)
        by = {lv.name: lv for lv in result.levels}
        assert by["same_key"].shared
        assert by["other_tenant"].leak, (by["other_tenant"].p_value, by["other_tenant"].verdict)

    def test_the_engine_with_isolation_on_passes(self, tiny_engine):
        result = _engine_timing(tiny_engine, isolate=True, trials=24)
        by = {lv.name: lv for lv in result.levels}
        assert by["same_key"].shared  # the positive control: its prefix cache works
        assert by["same_tenant"].shared  # tenant scope: a tenant's keys share its prefixes
        assert not by["other_tenant"].shared, by["other_tenant"].p_value
        assert by["other_tenant"].verdict == "isolated"
        assert result.findings(at=0.0) == []

    def test_the_cli_prints_a_verdict_per_level_and_exits_1_on_a_leak(self, tiny_engine, tmp_path):
        from typer.testing import CliRunner

        from audit import FileJournal
        from cachesvc.cli import app
        from cachesvc.engine_app import create_engine_app

        tiny_engine.isolate_tenants = False
        engine_app = create_engine_app(tiny_engine, api_keys={KEY_A: "acme", KEY_B: "globex"})
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'state_dir = "{tmp_path}"\n')
        with serving(engine_app) as server:
            res = CliRunner().invoke(app, [
                "audit", "timing", "--url", server.url, "--key-a", KEY_A, "--key-b", KEY_B,
                "--trials", "8", "--alpha", "0.01", "--seed", "1", "--config", str(cfg),
                "--findings", str(tmp_path / "f.jsonl")])
        assert res.exit_code == 1, res.output
        assert "other_tenant" in res.output and "LEAK" in res.output
        journal = FileJournal(tmp_path / "f.jsonl")
        assert [f.kind for f in journal.findings()] == ["timing"]
        assert journal.load_result("timing")["leaks"] == ["other_tenant"]

    def test_the_cache_service_in_front_of_the_engine_keeps_tenants_apart(self, tiny_engine,
                                                                          tmp_path):
        from cachesvc.app import create_app
        from cachesvc.auditing import HttpProber
        from cachesvc.upstream import EngineUpstream
        from tests.service_helpers import KEY_A as SVC_A
        from tests.service_helpers import KEY_B as SVC_B
        from tests.service_helpers import make_settings

        tiny_engine.isolate_tenants = True
        settings = make_settings(tmp_path, upstream={"model": "random-tiny"})
        app = create_app(settings, upstream=EngineUpstream(tiny_engine))
        with serving(app) as server:
            prober = HttpProber(server.url, model=tiny_engine.model_id)
            try:
                result = run_timing(levels_for_keys(key_a=SVC_A, key_b=SVC_B), prober,
                                    target=server.url,
                                    config=TimingConfig(trials=20, prompt_words=300, alpha=1e-3),
                                    rng=random.Random(5))
            finally:
                prober.close()
        by = {lv.name: lv for lv in result.levels}
        assert by["same_key"].shared  # the engine's prefix cache shows through the service
        assert by["other_tenant"].verdict == "isolated", by["other_tenant"].p_value
