"""The background drift sampler: a planted bad quantization is caught from served requests alone
(no audit run) and INT8 turned off for the bad layer; a clean run stays under the thresholds;
the token budget and the queue bound skip (and count) what they cannot afford; a queued sample
waits for the engine to be idle rather than slowing a request."""

from __future__ import annotations

import threading

import pytest

from gpu_prefix.drift import corpus
from gpu_prefix.drift_sampler import DriftSampler, DriftSamplerConfig
from gpu_prefix.engine import GenerationParams
from gpu_prefix.errors import InvalidParamsError
from tests.support.clock import FakeClock
from tests.support.waiting import wait_for
from tests.test_gpu_prefix_drift import plant

LONG = GenerationParams(max_tokens=200, min_tokens=200)  # 128 positions in 0-128, 72 in 128-512


def sampling(**kw) -> DriftSamplerConfig:
    kw.setdefault("rate", 1.0)
    kw.setdefault("tokens_per_minute", 1_000_000)
    kw.setdefault("busy_wait_s", 0.05)
    return DriftSamplerConfig(**kw)


@pytest.fixture
def sampled_engine(make_engine):
    engines = []

    def make(**kw):
        engine = make_engine(kv_dtype="int8", pool_bytes=2**21, drift_sampling=sampling(**kw))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


class TestDriftSamplerGuard:
    def test_a_planted_fault_is_caught_in_the_background_from_served_requests(self, sampled_engine):
        engine = sampled_engine()
        trips = []
        engine.drift_sampler.on_trip = trips.append
        plant(engine, zero_v=frozenset({1}))
        for prompt in corpus(engine, prompts=2, seed=0):
            engine.generate(prompt, LONG)
        wait_for(lambda: engine.drift_sampler.stats().trips == 1)
        [report] = trips
        assert report.source == "sampler" and report.exceeded and report.action == "layers:1"
        assert max(report.layers, key=lambda e: e.v_rel_error).layer == 1
        # the guard acted: layer 1 in full precision, the rest INT8; the on-demand audit never ran
        assert engine.int8_full_layers == {1} and engine.kv_dtype == "int8"
        assert engine.last_drift is None
        st = engine.drift_sampler.stats()
        assert st.sampled >= 1 and st.skipped_budget == 0

    def test_a_clean_int8_run_stays_under_the_thresholds(self, sampled_engine):
        engine = sampled_engine()
        prompts = corpus(engine, prompts=3, seed=1)
        for prompt in prompts:
            engine.generate(prompt, LONG)
        assert engine.drift_sampler.wait_drained(60)
        st = engine.drift_sampler.stats()
        assert st.offered == st.sampled == 3 and st.trips == 0 and st.exceeded == []
        assert st.figures["0-128"].tokens == 3 * 128 and st.figures["128-512"].tokens == 3 * 72
        assert 0 < st.figures["all"].kld_mean < 1e-3 and st.figures["all"].top1_agreement > 0.95
        assert engine.kv_dtype == "int8" and engine.int8_full_layers == frozenset()

    def test_full_precision_engines_have_no_sampler(self, make_engine):
        engine = make_engine(drift_sampling=sampling())
        try:
            assert engine.drift_sampler is None
        finally:
            engine.close()


class TestDriftSamplerBudget:
    def test_samples_over_the_token_budget_are_skipped_and_counted_until_it_refills(
        self, sampled_engine):
        engine = sampled_engine(rate=0.0)  # built by hand below, with a clock of its own
        clock = FakeClock()
        sampler = DriftSampler(engine, sampling(tokens_per_minute=100), clock=clock)
        engine.drift_sampler = sampler
        try:
            prompt, completion = list(range(10, 40)), list(range(40, 60))  # 50 tokens each time
            sampler.offer(prompt, completion, model=engine.model)
            sampler.offer(prompt, completion, model=engine.model)
            sampler.offer(prompt, completion, model=engine.model)
            assert sampler.stats().skipped_budget == 1
            clock.now += 30.0  # half a minute refills 50 tokens
            sampler.offer(prompt, completion, model=engine.model)
            sampler.offer(prompt, completion, model=engine.model)
            assert sampler.wait_drained(60)
            st = sampler.stats()
            assert st.offered == 5 and st.sampled == 3 and st.skipped_budget == 2
            assert st.replay_tokens == 3 * 49  # the last token of each never runs
        finally:
            sampler.close()

    def test_the_sampled_share_is_seeded(self, sampled_engine):
        def picks(seed: int) -> list[int]:
            engine = sampled_engine(rate=0.0)
            sampler = DriftSampler(engine, sampling(rate=0.3, seed=seed, max_queue=1000))
            chosen = []
            for i in range(100):
                before = sampler.stats().chosen
                sampler.offer([1, 2, 3], [4], model=engine.model)
                if sampler.stats().chosen > before:
                    chosen.append(i)
            sampler.close()
            return chosen

        assert picks(7) == picks(7) != picks(8)
        assert 15 <= len(picks(7)) <= 45

    def test_a_bad_setting_is_refused_by_name(self, make_engine):
        for kw, name in (({"rate": 1.5}, "drift_sample_rate"),
                         ({"tokens_per_minute": 0}, "tokens_per_minute"),
                         ({"chunk_tokens": 3}, "chunk_tokens")):
            with pytest.raises(InvalidParamsError, match=name):
                make_engine(kv_dtype="int8", drift_sampling=sampling(**kw))


class TestDriftSamplerNeverBlocksServing:
    def test_a_request_runs_to_its_end_while_a_sample_waits_for_the_engine_to_be_idle(
        self, sampled_engine):
        engine = sampled_engine(rate=0.0)
        sampler = DriftSampler(engine, sampling(busy_wait_s=60))
        engine.drift_sampler = sampler
        prompt = corpus(engine, prompts=1, seed=3)[0]
        seen_while_running = []
        events = engine.generate_stream(prompt, GenerationParams(max_tokens=300, min_tokens=300))
        first = next(events)
        sampler.offer(prompt, [first.token_id] * 100,
                      model=engine.model)  # queued while the request runs
        for n, _ in enumerate(events):
            if n < 250:
                seen_while_running.append(sampler.stats().replay_tokens)
        assert n == 299  # 299 more tokens, then the final event: the request was never held up
        assert set(seen_while_running) == {0}  # nothing replayed while it ran
        assert sampler.wait_drained(60)
        st = sampler.stats()
        assert st.sampled == 2 and st.busy_chunks == 0  # the queued sample, then the request itself
        sampler.close()

    def test_under_sustained_load_chunks_run_between_steps_and_requests_still_finish(
        self, sampled_engine):
        engine = sampled_engine(rate=0.0)
        sampler = DriftSampler(engine, sampling(busy_wait_s=0.0, chunk_tokens=16))
        engine.drift_sampler = sampler
        prompt = corpus(engine, prompts=1, seed=4)[0]
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            engine.generate(prompt,
                            GenerationParams(max_tokens=150, min_tokens=150)))) for _ in range(2)]
        for t in threads:
            t.start()
        wait_for(lambda: engine.stats().running == 2)
        sampler.offer(prompt, (prompt * 8)[:200],
                      model=engine.model)  # the engine is busy from the start
        for t in threads:
            t.join(120)
        assert [len(r.token_ids) for r in results] == [150, 150]
        assert sampler.wait_drained(60)
        st = sampler.stats()
        assert st.sampled == 3 and st.busy_chunks >= 1  # the sample and the two requests themselves
        sampler.close()
