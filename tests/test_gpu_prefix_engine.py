"""The reference engine: sampling, stop sequences, logprobs and scoring, tenants, rollouts,
and behaviour under a burst larger than the KV pool."""

from __future__ import annotations

import threading

import pytest

from gpu_prefix.engine import Engine, FinalEvent, GenerationParams, TokenEvent
from gpu_prefix.errors import AdmissionRefusedError, InvalidParamsError
from gpu_prefix.models import load_model


def prompt_of(engine: Engine, text: str) -> list[int]:
    return engine.chat_prompt_ids([{"role": "user", "content": text}])


LONG = "You are a careful assistant. Answer briefly and precisely, citing nothing. " * 2


class TestModels:
    def test_random_tiny_is_the_same_model_in_every_load(self, tiny_model):
        again = load_model("random-tiny")
        for a, b in zip(tiny_model.model.parameters(), again.model.parameters(), strict=True):
            assert a.equal(b)

    def test_an_unknown_model_name_is_refused_with_the_choices(self):
        with pytest.raises(ValueError, match="random-tiny, smollm2"):
            load_model("gpt-9")


class TestSampling:
    def test_greedy_is_deterministic(self, tiny_engine: Engine):
        p = prompt_of(tiny_engine, "hello")
        a = tiny_engine.generate(p, GenerationParams(max_tokens=12, temperature=0.0))
        b = tiny_engine.generate(p, GenerationParams(max_tokens=12, temperature=0.0))
        assert a.token_ids == b.token_ids and len(a.token_ids) == 12 and a.finish_reason == "length"

    def test_the_same_seed_gives_the_same_sample_and_another_seed_differs(
        self, tiny_engine: Engine):
        p = prompt_of(tiny_engine, "hello")
        runs = [tiny_engine.generate(p,
                                     GenerationParams(
                                         max_tokens=16, temperature=1.5,
                                         seed=s)) for s in (1, 1, 2)]
        assert runs[0].token_ids == runs[1].token_ids
        assert runs[0].token_ids != runs[2].token_ids

    def test_top_p_near_zero_is_greedy(self, tiny_engine: Engine):
        p = prompt_of(tiny_engine, "hello")
        greedy = tiny_engine.generate(p, GenerationParams(max_tokens=10, temperature=0.0))
        nucleus = tiny_engine.generate(p,
                                       GenerationParams(max_tokens=10, temperature=1.0, top_p=1e-6,
                                                        seed=3))
        assert greedy.token_ids == nucleus.token_ids

    def test_stop_sequences_end_the_text_before_the_stop(self, tiny_engine: Engine):
        p = prompt_of(tiny_engine, "hello")
        full = tiny_engine.generate(p, GenerationParams(max_tokens=20, temperature=0.0)).text
        stop = full[5:7]
        cut = tiny_engine.generate(p,
                                   GenerationParams(max_tokens=20, temperature=0.0, stop=(stop,)))
        assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"

    def test_streamed_text_joins_to_the_final_text_and_never_shows_a_stop(
        self, tiny_engine: Engine):
        p = prompt_of(tiny_engine, "hello")
        full = tiny_engine.generate(p, GenerationParams(max_tokens=20, temperature=0.0)).text
        stop = full[6:9]
        events = list(tiny_engine.generate_stream(p,
                                                  GenerationParams(max_tokens=20, temperature=0.0,
                                                                   stop=(stop,))))
        final = events[-1]
        assert isinstance(final, FinalEvent)
        shown = "".join(e.text for e in events if isinstance(e, TokenEvent)) + final.text
        assert shown == final.result.text and stop not in shown

    def test_reported_logprobs_equal_teacher_forced_scores(self, tiny_engine: Engine):
        p = prompt_of(tiny_engine, LONG)
        salt = tiny_engine.scope_salt_for("t")
        r = tiny_engine.generate(p,
                                 GenerationParams(max_tokens=10, temperature=0.0, logprobs=True,
                                                  top_logprobs=3,
                                                     scope_salt=salt))
        scores = tiny_engine.score(p, r.token_ids, scope_salt=salt)
        assert max(abs(a - b) for a, b in zip(scores, r.logprobs, strict=True)) < 1e-4
        assert all(len(t) == 3 and t[0][1] >= t[1][1] for t in r.top_logprobs)
        uncached = tiny_engine.score(p, r.token_ids, use_prefix_cache=False)
        assert max(abs(a - b) for a, b in zip(scores, uncached, strict=True)) < 1e-4

    @pytest.mark.parametrize(
        ("params", "field"),
        [
            (GenerationParams(max_tokens=0), "max_tokens"),
            (GenerationParams(temperature=3.0), "temperature"),
            (GenerationParams(top_p=0.0), "top_p"),
            (GenerationParams(stop=("",)), "stop"),
        ],
    )
    def test_bad_params_are_refused_naming_the_field(self, tiny_engine: Engine, params, field):
        with pytest.raises(InvalidParamsError, match=field):
            tiny_engine.generate([1, 2, 3], params)

    def test_prompts_past_the_context_or_the_vocabulary_are_refused(self, tiny_engine: Engine):
        with pytest.raises(InvalidParamsError, match="context"):
            tiny_engine.generate([1] * tiny_engine.max_context, GenerationParams(max_tokens=1))
        with pytest.raises(InvalidParamsError, match="vocabulary"):
            tiny_engine.generate([10**6], GenerationParams(max_tokens=1))


class TestCompletionBlocks:
    def test_a_follow_up_that_continues_a_completion_reuses_its_blocks_exactly(
        self, tiny_engine: Engine):
        salt = tiny_engine.scope_salt_for("t")
        prompt = prompt_of(tiny_engine, "hello")
        first = tiny_engine.generate(prompt,
                                     GenerationParams(max_tokens=40, temperature=0.0,
                                                      scope_salt=salt))
        follow = prompt + list(first.token_ids) + tiny_engine.encode(" and more")
        reused = tiny_engine.generate(follow,
                                      GenerationParams(max_tokens=8, temperature=0.0,
                                                       scope_salt=salt))
        fresh = tiny_engine.generate(follow,
                                     GenerationParams(max_tokens=8, temperature=0.0,
                                                      use_prefix_cache=False))
        assert reused.cached_tokens == (len(prompt) + 39) // 16 * 16 > len(prompt) // 16 * 16
        assert reused.token_ids == fresh.token_ids
        assert max((abs(a - b) for a, b in zip(reused.logprobs, fresh.logprobs, strict=True)),
                   default=0.0) < 1e-4
        tiny_engine.store.check_valid()


class TestTenants:
    def test_two_tenants_never_share_blocks(self, tiny_engine: Engine):
        p = prompt_of(tiny_engine, LONG)
        a = GenerationParams(max_tokens=2, temperature=0.0,
                             scope_salt=tiny_engine.scope_salt_for("a"))
        b = GenerationParams(max_tokens=2, temperature=0.0,
                             scope_salt=tiny_engine.scope_salt_for("b"))
        tiny_engine.generate(p, a)
        assert tiny_engine.generate(p, b).cached_tokens == 0
        assert tiny_engine.generate(p, a).cached_tokens > 0

    def test_a_request_without_a_salt_shares_nothing(self, tiny_engine: Engine):
        p = prompt_of(tiny_engine, LONG)
        before = tiny_engine.store.stats().inserted_blocks_total
        tiny_engine.generate(p, GenerationParams(max_tokens=1))
        assert tiny_engine.generate(p, GenerationParams(max_tokens=1)).cached_tokens == 0
        tiny_engine.score(p[:8], p[8:16])
        # ...and stores nothing: blocks nobody could match would only evict other tenants'.
        assert tiny_engine.store.stats().inserted_blocks_total == before

    def test_a_prefix_configured_public_is_shared_and_nothing_after_it(self, make_engine):
        probe = make_engine()
        system = probe.encode("S" * 40)  # 40 byte tokens: two whole public blocks
        engine = make_engine(public_prefixes=[system])
        pa = system + engine.encode("tenant a asks about the weather today")
        pb = system + engine.encode("tenant a asks about the weather today")
        engine.generate(pa, GenerationParams(max_tokens=1, scope_salt=engine.scope_salt_for("a")))
        rb = engine.generate(pb,
                             GenerationParams(max_tokens=1, scope_salt=engine.scope_salt_for("b")))
        assert rb.cached_tokens == 32

    def test_isolation_off_shares_across_tenants(self, make_engine):
        engine = make_engine(isolate_tenants=False)
        p = prompt_of(engine, LONG)
        engine.generate(p, GenerationParams(max_tokens=1, scope_salt=engine.scope_salt_for("a")))
        assert engine.generate(p,
                               GenerationParams(max_tokens=1,
                                                scope_salt=engine.scope_salt_for(
                                                    "b"))).cached_tokens > 0


class TestRollout:
    def test_a_rollout_drops_old_blocks_but_not_those_of_requests_in_flight(
        self, tiny_engine: Engine):
        salt = tiny_engine.scope_salt_for("t")
        p = prompt_of(tiny_engine, LONG)
        other = prompt_of(tiny_engine, "something else entirely, long enough for blocks")
        tiny_engine.generate(other, GenerationParams(max_tokens=1, scope_salt=salt))
        stream = tiny_engine.generate_stream(p,
                                             GenerationParams(max_tokens=1000, temperature=0.0,
                                                              scope_salt=salt))
        first = next(stream)
        assert isinstance(first, TokenEvent)
        with tiny_engine.scheduler.paused():  # the request stays in flight, frozen between steps
            pinned_before = tiny_engine.store.pinned_hashes()
            held = tiny_engine.stats().held_blocks
            assert pinned_before and tiny_engine.stats().running == 1
            tiny_engine.on_rollout(tiny_engine.model, 2)
            tiny_engine.store.check_valid()
            assert tiny_engine.store.pinned_hashes() == pinned_before  # in-flight blocks kept
            assert tiny_engine.stats().used_blocks == held  # the rest dropped
        rest = list(stream)
        assert isinstance(rest[-1], FinalEvent)
        assert tiny_engine.stats(
            ).used_blocks == 0  # its blocks were of the old epoch: freed at the end
        tiny_engine.store.check_valid()
        r = tiny_engine.generate(p, GenerationParams(max_tokens=1, scope_salt=salt))
        assert r.cached_tokens == 0

    def test_a_rollout_needs_a_fresh_epoch(self, tiny_engine: Engine):
        with pytest.raises(InvalidParamsError, match="fresh epoch"):
            tiny_engine.on_rollout(None, tiny_engine.model_epoch)


class TestBurst:
    def test_a_burst_larger_than_the_pool_queues_or_refuses_and_every_admitted_request_is_right(
        self, make_engine):
        reference = make_engine()
        prompts = [prompt_of(reference, f"{i} " + LONG * 3) for i in range(12)]
        expected = [reference.generate(p,
                                       GenerationParams(max_tokens=6, temperature=0.0,
                                                        use_prefix_cache=False))
                    for p in prompts]
        # Room for about two prompts' blocks under the watermark; two running, three waiting.
        per_prompt = reference.pool.block_bytes * (len(prompts[0]) // 16 + 1)
        engine = make_engine(pool_bytes=int(per_prompt * 2.6), max_running=2, max_queue=3,
                             queue_timeout_s=30)
        results: dict[int, object] = {}
        start = threading.Barrier(len(prompts))
        stop_checking = threading.Event()
        problems: list[BaseException] = []

        def run(i: int) -> None:
            start.wait()
            try:
                results[i] = engine.generate(prompts[i], GenerationParams(
                    max_tokens=6, temperature=0.0, scope_salt=engine.scope_salt_for("t")))
            except AdmissionRefusedError as exc:
                results[i] = exc

        def check() -> None:
            while not stop_checking.is_set():
                try:
                    engine.store.check_valid()
                except BaseException as exc:  # noqa: BLE001 - reported below
                    problems.append(exc)
                    return

        checker = threading.Thread(target=check)
        checker.start()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        stop_checking.set()
        checker.join()
        assert not problems, problems
        refused = [i for i, r in results.items() if isinstance(r, AdmissionRefusedError)]
        done = [i for i, r in results.items() if not isinstance(r, AdmissionRefusedError)]
        assert len(results) == len(prompts)
        assert refused and len(done) >= 5
        assert all(results[i].retryable for i in refused)
        for i in done:
            assert results[i].token_ids == expected[i].token_ids
        s = engine.stats()
        assert s.refused_total == len(refused) and s.pinned_blocks == 0 and s.running == 0
        assert s.used_bytes <= s.capacity_bytes
        engine.store.check_valid()
