"""The drift measure and its guard: a clean INT8 run on random-tiny stays under the thresholds;
a planted bad quantization (coarsened or zeroed scales in some layers) is caught, attributed to
its layers, and INT8 is turned off for those layers (or the model when no layer stands out)."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch

from gpu_prefix.drift import (
    BUCKETS,
    DEFAULT_THRESHOLDS,
    DriftThresholds,
    LayerError,
    attribute,
    corpus,
    guard,
    measure,
    thresholds_for,
)
from gpu_prefix.engine import GenerationParams
from gpu_prefix.kvquant import QMAX

TOKENS = 600  # reaches the 512+ bucket


def plant(engine, *, coarsen: frozenset[int] = frozenset(), zero_k: frozenset[int] = frozenset(),
          zero_v: frozenset[int] = frozenset()) -> None:
    """A bad quantization in some layers: K scales 128x too coarse (about 1 bit), or K or V
    scales zeroed. (random-tiny's near-flat distributions shrug off milder faults: a 16x
    coarsening of one layer stays under the thresholds there.)"""
    quant = engine.pool.quant

    def k_scale_for(layer, amax):
        if layer in zero_k:
            return torch.zeros_like(amax)
        return amax / QMAX * (128.0 if layer in coarsen else 1.0)

    def v_scale_for(layer, amax):
        return torch.zeros_like(amax) if layer in zero_v else amax / QMAX

    quant.k_scale_for, quant.v_scale_for = k_scale_for, v_scale_for


@pytest.fixture
def int8_engine(make_engine):
    engine = make_engine(kv_dtype="int8", pool_bytes=2**21)
    yield engine
    engine.close()


class TestDriftMeasure:
    def test_a_clean_int8_run_on_random_tiny_stays_under_the_default_thresholds(self, int8_engine):
        prompts = corpus(int8_engine, prompts=2, seed=0)
        report = guard(int8_engine, prompts, max_tokens=TOKENS)
        assert report.exceeded == []
        assert int8_engine.kv_dtype == "int8" and int8_engine.pool.quant is not None
        assert report.overall.tokens == 2 * TOKENS
        assert [report.buckets[name].tokens for name, _, _ in BUCKETS] == [2 * 128, 2 * 384, 2 * 88]
        assert 0 < report.overall.kld_mean < 1e-3 and report.overall.top1_agreement > 0.95
        assert all(0 <= f <= TOKENS for f in report.first_divergence)
        # every layer's K/V error is about int8's half step, a fraction of a percent
        assert len(report.layers) == 2 and all(
            e.k_rel_error < 0.02 and e.v_rel_error < 0.02 for e in report.layers)

    def test_the_corpus_is_fixed_by_its_seed(self, int8_engine):
        assert corpus(int8_engine, prompts=3, seed=4) == corpus(int8_engine, prompts=3, seed=4)
        assert corpus(int8_engine, prompts=3, seed=4) != corpus(int8_engine, prompts=3, seed=5)

    def test_measuring_a_full_precision_engine_is_refused(self, make_engine):
        fp = make_engine()
        try:
            with pytest.raises(ValueError, match="not INT8"):
                measure(fp, fp, [[1, 2, 3]], max_tokens=4)
        finally:
            fp.close()


class TestDriftGuard:
    def test_a_fault_in_every_layer_is_caught_and_int8_turned_off_for_the_whole_model(
        self, int8_engine, make_engine):
        plant(int8_engine, coarsen=frozenset({0, 1}))
        salt = int8_engine.scope_salt_for("t")
        prompts = corpus(int8_engine, prompts=2, seed=0)
        int8_engine.generate(prompts[0], GenerationParams(max_tokens=20, scope_salt=salt))
        assert int8_engine.stats().cached_blocks > 0  # INT8 blocks in the index
        report = guard(int8_engine, prompts, max_tokens=TOKENS)
        assert report.exceeded and report.action == "model", report.as_dict()
        # INT8 is off: a full-precision pool, no INT8 block left, answers as full precision gives
        assert int8_engine.kv_dtype == "full" and int8_engine.pool.quant is None
        assert int8_engine.int8_disabled_reason
        assert int8_engine.stats().cached_blocks == 0
        fp = make_engine(pool_bytes=2**21)
        try:
            params = GenerationParams(max_tokens=40, min_tokens=40, scope_salt=salt)
            assert int8_engine.generate(prompts[1], params).token_ids == fp.generate(
                prompts[1], params).token_ids
            again = int8_engine.generate(prompts[1], params)
            assert again.cached_tokens > 0  # full-precision blocks are indexed and shared again
        finally:
            fp.close()
        int8_engine.store.check_valid()

    @pytest.mark.parametrize("fault", [{"zero_k": frozenset({0})}, {"zero_v": frozenset({1})}])
    def test_a_fault_in_one_layer_is_attributed_and_int8_turned_off_for_that_layer_only(
        self, int8_engine, fault):
        plant(int8_engine, **fault)
        bad = next(iter(fault.values()))
        salt = int8_engine.scope_salt_for("t")
        prompts = corpus(int8_engine, prompts=2, seed=0)
        params = GenerationParams(max_tokens=20, scope_salt=salt)
        int8_engine.generate(prompts[0], params)
        int8_blocks = set(int8_engine.store.cached_hashes())
        assert int8_blocks
        report = guard(int8_engine, prompts, max_tokens=TOKENS)
        assert report.exceeded, report.as_dict()
        assert attribute(report.layers) == bad
        assert report.action == "layers:" + ",".join(map(str, sorted(bad)))
        # that layer is stored in full precision, the others stay INT8 (with the same rules)
        assert int8_engine.kv_dtype == "int8" and int8_engine.int8_full_layers == bad
        assert int8_engine.int8_layers_disabled_reason and int8_engine.int8_disabled_reason is None
        assert int8_engine.pool.kv_key == "int8+full:" + ",".join(map(str, sorted(bad)))
        # the old blocks are gone, and the same prompt now hashes to other blocks
        assert int8_engine.stats().cached_blocks == 0
        int8_engine.generate(prompts[0], params)
        assert int8_blocks.isdisjoint(int8_engine.store.cached_hashes())
        assert int8_engine.generate(prompts[0], params).cached_tokens > 0
        # measured again, the mixed storage is within the thresholds and nothing more is turned off
        again = guard(int8_engine, prompts, max_tokens=TOKENS)
        assert again.exceeded == [] and again.action == "" and int8_engine.int8_full_layers == bad
        int8_engine.store.check_valid()

    def test_a_second_trip_on_a_layer_already_in_full_precision_turns_int8_off_for_the_model(
        self, int8_engine):
        # a strict threshold trips on every measure; layer 0's zeroed K scales single it out
        # each time (its error is measured as INT8 would store it, whatever the pool keeps now)
        plant(int8_engine, zero_k=frozenset({0}))
        strict = DriftThresholds(kld_mean=0.0, kld_p99=1.0, top1_agreement=0.0)
        prompts = corpus(int8_engine, prompts=1, seed=0)
        first = guard(int8_engine, prompts, max_tokens=64, thresholds=strict)
        assert first.exceeded and attribute(first.layers) == {0}
        assert first.action == "layers:0" and int8_engine.kv_dtype == "int8"
        assert int8_engine.int8_full_layers == {0}
        second = guard(int8_engine, prompts, max_tokens=64, thresholds=strict)
        assert second.exceeded and attribute(second.layers) == {0}
        # nothing left to turn off per layer: the model goes to full precision
        assert second.action == "model" and int8_engine.kv_dtype == "full"
        assert int8_engine.pool.quant is None and int8_engine.int8_disabled_reason
        int8_engine.store.check_valid()

    def test_a_per_layer_switch_keeps_the_planted_scale_rules(self, int8_engine):
        plant(int8_engine, zero_k=frozenset({1}))
        int8_engine.disable_int8("test", layers={0})
        quant = int8_engine.pool.quant
        amax = torch.ones(1, 1, 1)
        assert float(quant.k_scale_for(1, amax).sum()) == 0.0  # layer 1 stays zeroed
        assert float(quant.v_scale_for(1, amax).sum()) == pytest.approx(1.0 / QMAX)

    def test_a_per_layer_switch_lets_the_old_int8_storage_go(self, int8_engine):
        old = weakref.ref(int8_engine.pool.quant)
        int8_engine.disable_int8("test", layers={0})
        gc.collect()
        assert int8_engine.pool.quant is not None and old() is None

    @pytest.mark.parametrize("layers", [None, {0}])
    def test_the_old_int8_storage_is_let_go_before_the_new_pool_is_allocated(
        self, int8_engine, monkeypatch, layers):
        import gpu_prefix.kv_switch as kv_switch

        old = weakref.ref(int8_engine.pool.quant)
        freed = []
        real = kv_switch.KVPool

        def pool(*args, **kwargs):
            gc.collect()
            freed.append(old() is None)
            return real(*args, **kwargs)

        monkeypatch.setattr(kv_switch, "KVPool", pool)
        int8_engine.disable_int8("test", layers=layers)
        assert freed == [True]  # the two pools never hold the byte budget twice

    def test_a_layer_stands_out_only_over_the_floor_and_the_others_by_an_order_of_magnitude(self):
        def errs(*values):
            return [LayerError(layer=i, k_rel_error=v,
                               v_rel_error=v / 2) for i, v in enumerate(values)]

        assert attribute(errs(0.004, 0.9)) == {1}
        assert attribute(errs(0.004, 0.03)) == frozenset()  # 7x, and under the 5% floor
        assert attribute(errs(0.3, 0.4, 0.5)) == frozenset(
            )  # all bad alike: the model, not a layer
        assert attribute(errs(0.01, 0.01, 0.9, 0.8)) == {2, 3}
        assert attribute([]) == frozenset()

    def test_thresholds_are_looked_up_per_model_with_a_default(self):
        own = DriftThresholds(kld_mean=0.5, kld_p99=1.0, top1_agreement=0.5)
        assert thresholds_for("smollm2", {"smollm2": own}) is own
        assert thresholds_for("other", {"smollm2": own}) == DEFAULT_THRESHOLDS["default"]

    def test_a_strict_threshold_trips_on_clean_int8_and_turns_it_off(self, int8_engine):
        strict = DriftThresholds(kld_mean=0.0, kld_p99=1.0, top1_agreement=0.0)
        report = guard(int8_engine, corpus(int8_engine, prompts=1, seed=1), max_tokens=64,
                       thresholds=strict,
                       per_layer=False)
        assert report.exceeded and report.exceeded[0].startswith("all: mean KLD")
        assert int8_engine.kv_dtype == "full"

    def test_requests_in_flight_when_int8_turns_off_finish_in_full_precision(self, int8_engine):
        salt = int8_engine.scope_salt_for("t")
        prompt = corpus(int8_engine, prompts=1, seed=2)[0]
        results = {}
        started = threading.Event()

        def run() -> None:
            for _event in int8_engine.generate_stream(prompt,
                                                     GenerationParams(max_tokens=300,
                                                                      min_tokens=300,
                                                                              scope_salt=salt)):
                started.set()
                results.setdefault("events", 0)
                results["events"] += 1

        t = threading.Thread(target=run)
        t.start()
        assert started.wait(30)
        dropped = int8_engine.disable_int8("test")
        t.join(60)
        assert dropped > 0 and results["events"] == 301  # 300 tokens, then the final event
        assert int8_engine.stats().preempted_total >= 1
        int8_engine.store.check_valid()
        assert all(h is not None for h in int8_engine.store.cached_hashes())
