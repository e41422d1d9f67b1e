"""The continuous-batching scheduler: batched output equals solo decoding token for token,
attention that reads the pool in place equals a full forward, chunked prefill keeps decodes
moving, admission at the watermark, preemption, and bursts."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_prefix.attention import StepLayout, install, packed_forward, seq_slice
from gpu_prefix.engine import Engine, FinalEvent, GenerationParams, TokenEvent
from gpu_prefix.errors import AdmissionRefusedError, InvalidParamsError
from gpu_prefix.models import LoadedModel
from tests.support.waiting import wait_for

BLOCK_BYTES = 16 * 512  # random-tiny: 16 tokens x 2 layers x K,V x 2 heads x 16 dims x 4 bytes


def greedy_reference(model, prompt: list[int], max_tokens: int, eos: frozenset[int]) -> list[int]:
    """Greedy decoding by full forwards, no cache of any kind: the independent reference."""
    ids = list(prompt)
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(max_tokens):
            tok = int(torch.argmax(model(input_ids=torch.tensor([ids])).logits[0, -1]))
            if tok in eos:
                break
            out.append(tok)
            ids.append(tok)
    return out


def run_arrivals(engine: Engine,
                 requests: list[tuple[int, list[int], GenerationParams]]) -> dict[int, object]:
    """Each request starts once the engine has run ``arrival`` steps; returns results (or the
    exception) by index."""
    results: dict[int, object] = {}
    base = engine.stats().steps_total

    def run(i: int, arrival: int, prompt: list[int], params: GenerationParams) -> None:
        wait_for(
            lambda: engine.stats().steps_total >= base + arrival or engine.stats().running == 0)
        try:
            results[i] = engine.generate(prompt, params)
        except Exception as exc:  # noqa: BLE001 - asserted by the caller
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, *r)) for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


class TestBatchedEqualsSolo:
    @settings(max_examples=12, deadline=None)
    @given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 6),
           pool_blocks=st.sampled_from([20, 28, 200]),
           max_batch_tokens=st.sampled_from([24, 40, 512]))
    def test_batched_greedy_output_equals_solo_decoding_token_for_token(
        self, tiny_model: LoadedModel, seed, n, pool_blocks, max_batch_tokens
    ):
        """Varied prompt lengths and arrival steps, shared prefixes, chunked prefill (small
        budgets) and preemption (small pools) all leave every answer exactly the solo one."""
        engine = Engine(tiny_model, pool_bytes=pool_blocks * BLOCK_BYTES, max_running=4,
                        max_batch_tokens=max_batch_tokens, max_queue=16)
        rng = random.Random(seed)
        vocab = engine.vocab_size
        shared = [[rng.randrange(vocab) for _ in range(rng.randrange(0, 48))] for _ in range(2)]
        salts = [engine.scope_salt_for("a"), engine.scope_salt_for("b"), None]
        requests = []
        for _ in range(n):
            prompt = rng.choice(shared) + [
                rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
            params = GenerationParams(max_tokens=rng.randrange(1, 24), temperature=0.0,
                                      scope_salt=rng.choice(salts))
            requests.append((rng.randrange(0, 6), prompt, params))
        results = run_arrivals(engine, requests)
        for i, (_, prompt, params) in enumerate(requests):
            r = results[i]
            assert not isinstance(r, BaseException), r
            assert list(r.token_ids) == greedy_reference(engine.model, prompt, params.max_tokens,
                                                         engine.eos_ids)
        s = engine.stats()
        assert s.held_blocks == 0 and s.running == 0 and s.queued == 0
        engine.store.check_valid()


class TestInPlaceAttention:
    def test_logits_from_fragmented_and_shared_block_tables_equal_a_full_forward(
        self, tiny_model: LoadedModel):
        """Two sequences packed in one step, one reading a fragmented table (gathered), one a
        single run (a view), then a second step continuing both: every logit within 1e-4."""
        model = tiny_model.model
        install(model)
        bs = 4
        pool = torch.zeros((2, 2, 2, 64 * bs, 16))
        rng = random.Random(1)
        a = [rng.randrange(10, 200) for _ in range(21)]
        b = [rng.randrange(10, 200) for _ in range(7)]
        tab_a, tab_b = [5, 6, 1, 9, 10, 11], [20, 21, 22]

        def slots(tab, lo, hi):
            return [tab[p // bs] * bs + p % bs for p in range(lo, hi)]

        def step(parts):
            ids, pos, write, seqs, q = [], [], [], [], 0
            for tokens, tab, lo, hi in parts:
                ids += tokens[lo:hi]
                pos += list(range(lo, hi))
                write += slots(tab, lo, hi)
                seqs.append(seq_slice(q_start=q, q_len=hi - lo, ctx_len=hi, table=tab,
                                      block_size=bs,
                                      device=pool.device))
                q += hi - lo
            layout = StepLayout(write_slots=torch.tensor(write), seqs=tuple(seqs))
            with torch.inference_mode():
                return packed_forward(model, pool, ids, pos, layout, list(range(len(ids))))

        first = step([(a, tab_a, 0, 13), (b, tab_b, 0, 7)])
        second = step([(a, tab_a, 13, 21), (b + [42], tab_b, 7, 8)])
        third = step([(a + [77], tab_a, 21, 22), (b + [42, 43], tab_b, 8, 9)])  # two decodes
        with torch.inference_mode():
            full_a = model(input_ids=torch.tensor([a + [77]])).logits[0]
            full_b = model(input_ids=torch.tensor([b + [42, 43]])).logits[0]
        assert (first[:13] - full_a[:13]).abs().max().item() < 1e-4
        assert (first[13:] - full_b[:7]).abs().max().item() < 1e-4
        assert (second[:8] - full_a[13:21]).abs().max().item() < 1e-4
        assert (second[8] - full_b[7]).abs().max().item() < 1e-4
        assert (third[0] - full_a[21]).abs().max().item() < 1e-4
        assert (third[1] - full_b[8]).abs().max().item() < 1e-4

        def layout_of(q_len, ctx_len, tab):
            return seq_slice(q_start=0, q_len=q_len, ctx_len=ctx_len, table=tab, block_size=bs,
                             device=pool.device)

        assert layout_of(8, 21, tab_a).gather is not None  # a chunk over three runs gathers
        assert layout_of(1, 22, tab_a).gather is None and len(
            layout_of(1, 22, tab_a).runs) == 3  # a decode does not
        assert layout_of(1, 8, tab_b).run == 80  # one run: a view

    def test_a_plain_forward_over_a_cache_is_unchanged(self, tiny_model: LoadedModel):
        """Several new tokens on top of a DynamicCache (what the prefix bench's baselines run)
        must see every cached key, as a full forward does."""
        from transformers import DynamicCache

        install(tiny_model.model)
        ids = list(range(40, 60))
        with torch.inference_mode():
            full = tiny_model.model(input_ids=torch.tensor([ids])).logits[0, 12:]
            cache = DynamicCache(config=tiny_model.model.config)
            tiny_model.model(input_ids=torch.tensor([ids[:12]]), cache=cache)
            tail = tiny_model.model(input_ids=torch.tensor([ids[12:]]), cache=cache).logits[0]
        assert (tail - full).abs().max().item() < 1e-4

    def test_a_plain_forward_of_the_same_model_is_unchanged(self, tiny_model: LoadedModel):
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        with torch.inference_mode():
            before = tiny_model.model(input_ids=ids).logits
            install(tiny_model.model)
            after = tiny_model.model(input_ids=ids).logits
        assert torch.equal(before, after)


class TestChunkedPrefill:
    def test_a_long_prompt_never_stalls_the_decodes_of_others(self, make_engine):
        """With a 40-token step budget, a 1,500-token prompt takes about 40 steps to prefill;
        a short request that arrives after it starts gets a token every step and finishes
        before the long one's first token."""
        engine = make_engine(pool_bytes=200 * BLOCK_BYTES, max_batch_tokens=40, max_running=4)
        rng = random.Random(5)
        long_prompt = [rng.randrange(engine.vocab_size) for _ in range(1500)]
        times: dict[str, float] = {}

        def long_request() -> None:
            for _ev in engine.generate_stream(long_prompt, GenerationParams(max_tokens=2)):
                times.setdefault("long_first", time.monotonic())

        t = threading.Thread(target=long_request)
        t.start()
        wait_for(lambda: engine.stats().steps_total >= 3)
        short = engine.generate([1, 2, 3, 4, 5], GenerationParams(max_tokens=10))
        times["short_done"] = time.monotonic()
        t.join(60)
        assert len(short.token_ids) + (short.finish_reason == "stop") >= 1
        assert times["short_done"] < times["long_first"]
        assert engine.stats().last_step_tokens <= 40


class TestSharing:
    def test_requests_in_one_batch_that_share_a_prefix_share_blocks(self, make_engine):
        engine = make_engine(max_running=4)
        salt = engine.scope_salt_for("t")
        prefix = list(range(100, 164))  # four whole blocks
        prompts = [prefix + [7, 8, 9], prefix + [11, 12, 13, 14]]
        with engine.scheduler.paused():  # both arrive before the first step
            results: list = [None, None]
            threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, engine.generate(
                prompts[i], GenerationParams(max_tokens=3, scope_salt=salt)))) for i in range(2)]
            for t in threads:
                t.start()
            wait_for(lambda: engine.stats().running == 2)
        for t in threads:
            t.join(30)
        assert sorted(r.cached_tokens for r in results) == [
            0, 64]  # the second read the first's blocks
        assert engine.stats().inserted_blocks_total == 4  # the prefix was stored once
        engine.store.check_valid()


class TestAdmission:
    def test_requests_past_the_watermark_queue_then_run_when_room_frees(self, make_engine):
        engine = make_engine(pool_bytes=20 * BLOCK_BYTES, max_running=8,
                             max_queue=4)  # limit 16 blocks
        prompts = [[i + 1] * 100 for i in range(3)]  # 7 blocks each: two fit under the watermark
        with engine.scheduler.paused():
            threads = [threading.Thread(target=engine.generate,
                                        args=(p, GenerationParams(max_tokens=4)))
                       for p in prompts]
            for t in threads:
                t.start()
            wait_for(lambda: engine.stats().running + engine.stats().queued == 3)
            assert engine.stats().running == 2 and engine.stats().queued == 1
        for t in threads:
            t.join(30)
        s = engine.stats()
        assert s.finished_total == 3 and s.refused_total == 0 and s.held_blocks == 0

    def test_a_full_queue_refuses_with_a_retryable_error(self, make_engine):
        engine = make_engine(max_running=1, max_queue=0)
        with engine.scheduler.paused():
            t = threading.Thread(target=engine.generate,
                                 args=([1, 2, 3], GenerationParams(max_tokens=2)))
            t.start()
            wait_for(lambda: engine.stats().running == 1)
            with pytest.raises(AdmissionRefusedError, match="retry") as info:
                engine.generate([4, 5, 6], GenerationParams(max_tokens=2))
        t.join(30)
        assert info.value.retryable and info.value.retry_after_s > 0
        assert engine.stats().refused_total == 1

    def test_a_wait_that_times_out_is_refused(self, make_engine):
        engine = make_engine(max_running=1, max_queue=2)
        with engine.scheduler.paused():
            t = threading.Thread(target=engine.generate,
                                 args=([1, 2, 3], GenerationParams(max_tokens=2)))
            t.start()
            wait_for(lambda: engine.stats().running == 1)
            got: list = []
            waiter = threading.Thread(target=lambda: got.append(pytest.raises(  # noqa: RUF061
                AdmissionRefusedError, engine.generate, [4, 5],
                GenerationParams(max_tokens=2, queue_timeout_s=0.01))))
            waiter.start()
            wait_for(lambda: engine.stats().queued == 1)
            time.sleep(0.05)
        waiter.join(30)
        t.join(30)
        assert got and "waited" in str(got[0].value)

    def test_a_request_that_could_never_fit_is_refused_naming_the_fix(self, make_engine):
        engine = make_engine(
            pool_bytes=10 * BLOCK_BYTES)  # 8 blocks under the watermark: 128 tokens
        with pytest.raises(InvalidParamsError, match=r"max_tokens.*larger pool"):
            engine.generate([1] * 100, GenerationParams(max_tokens=40))
        assert engine.generate([1] * 100, GenerationParams(max_tokens=20)).prompt_tokens == 100

    def test_max_tokens_over_the_per_request_budget_is_refused(self, make_engine):
        engine = make_engine(max_tokens_limit=8)
        with pytest.raises(InvalidParamsError, match="budget of 8"):
            engine.generate([1, 2, 3], GenerationParams(max_tokens=9))

    def test_settings_that_would_starve_prefill_are_refused(self, make_engine):
        with pytest.raises(InvalidParamsError, match="max_batch_tokens"):
            make_engine(max_running=8, max_batch_tokens=16)


class TestPreemption:
    def test_out_of_blocks_the_newest_request_is_preempted_and_recomputed_exactly(
        self, make_engine):
        # 12 blocks under the watermark; three requests admitted at 2 blocks each grow to 6.
        engine = make_engine(pool_bytes=15 * BLOCK_BYTES, max_running=3, max_queue=8)
        rng = random.Random(9)
        prompts = [[rng.randrange(engine.vocab_size) for _ in range(20)] for _ in range(3)]
        requests = [(0, p,
                     GenerationParams(max_tokens=70,
                                      scope_salt=engine.scope_salt_for("t"))) for p in prompts]
        results = run_arrivals(engine, requests)
        s = engine.stats()
        assert s.preempted_total > 0 and s.refused_total == 0
        for i, (_, prompt, _params) in enumerate(requests):
            assert list(results[i].token_ids) == greedy_reference(engine.model, prompt, 70,
                                                                  engine.eos_ids)
        assert s.held_blocks == 0
        engine.store.check_valid()


class TestBurst:
    def test_fifty_requests_into_a_pool_for_ten_never_fail_and_every_answer_is_exact(
        self, make_engine):
        reference = make_engine()
        rng = random.Random(11)
        prompts = [[rng.randrange(reference.vocab_size) for _ in range(40)] for _ in range(50)]
        params = GenerationParams(max_tokens=8)
        expected = [reference.generate(p, params).token_ids for p in prompts]
        # Each request holds 3 blocks: 30 blocks under the watermark hold 10 of them.
        engine = make_engine(pool_bytes=38 * BLOCK_BYTES, max_running=16, max_queue=10,
                             queue_timeout_s=30)
        problems: list[BaseException] = []
        stop = threading.Event()

        def check() -> None:
            while not stop.is_set():
                try:
                    engine.store.check_valid()
                    assert engine.stats().held_blocks <= engine.stats().num_blocks
                except BaseException as exc:  # noqa: BLE001 - reported below
                    problems.append(exc)
                    return

        checker = threading.Thread(target=check)
        checker.start()
        results = run_arrivals(engine, [(0, p, params) for p in prompts])
        stop.set()
        checker.join()
        assert not problems, problems
        refused = [i for i, r in results.items() if isinstance(r, AdmissionRefusedError)]
        served = [i for i, r in results.items() if not isinstance(r, BaseException)]
        assert len(refused) + len(served) == 50 and refused and len(served) >= 10
        assert all(results[i].retryable for i in refused)
        assert all(results[i].token_ids == expected[i] for i in served)
        s = engine.stats()
        assert s.refused_total == len(refused) and s.held_blocks == 0


class TestStreams:
    def test_a_stream_closed_early_releases_its_blocks_at_the_next_step(self, make_engine):
        engine = make_engine()
        stream = engine.generate_stream([1] * 40, GenerationParams(max_tokens=500))
        assert isinstance(next(stream), TokenEvent)
        stream.close()
        wait_for(lambda: engine.stats().running == 0)
        assert engine.stats().held_blocks == 0
        engine.store.check_valid()

    def test_events_end_with_one_final_event(self, make_engine):
        engine = make_engine()
        events = list(engine.generate_stream([1, 2, 3], GenerationParams(max_tokens=5)))
        assert isinstance(events[-1], FinalEvent)
        assert sum(isinstance(e, FinalEvent) for e in events) == 1


class TestScoringPreempted:
    def test_a_scoring_request_preempted_mid_prefill_is_recomputed_and_takes_no_logit_twice(
        self, make_engine):
        engine = make_engine(max_batch_tokens=20, max_running=2)
        rng = random.Random(3)
        prompt = [rng.randrange(engine.vocab_size) for _ in range(31)]
        completion = [rng.randrange(engine.vocab_size) for _ in range(400)]
        expected = make_engine().score(prompt, completion)
        seq = engine._logits_seq(prompt + completion[:-1], len(prompt) - 1, None, False)
        wait_for(lambda: seq.next_pos > len(prompt))  # some logits taken, most still to come
        with engine.scheduler.paused():
            assert seq.lease is not None, "finished before it could be preempted"
            with engine.scheduler._cond:
                engine.scheduler._preempt(seq)
            assert engine.stats().preempted_total == 1 and engine.stats().held_blocks == 0
        rows = engine._wait(seq)
        assert rows.shape[0] == len(completion)
        lp = torch.log_softmax(rows, dim=-1).gather(1, torch.tensor(completion)[:, None])[:, 0]
        assert max(abs(float(a) - b) for a, b in zip(lp, expected, strict=True)) < 1e-4
        engine.store.check_valid()


@pytest.mark.gpu
class TestBatchingOnCuda:
    def test_batched_greedy_on_cuda_equals_the_cpu_reference(self, tiny_model: LoadedModel):
        from gpu_prefix.models import load_model

        engine = Engine(load_model("random-tiny", device="cuda"), pool_bytes=40 * BLOCK_BYTES,
                        max_running=4,
                        max_batch_tokens=40)
        rng = random.Random(4)
        shared = [rng.randrange(engine.vocab_size) for _ in range(40)]
        requests = [(rng.randrange(0, 4),
                     shared + [
                         rng.randrange(engine.vocab_size) for _ in range(rng.randrange(1, 30))],
                     GenerationParams(max_tokens=20,
                                      scope_salt=engine.scope_salt_for("t"))) for _ in range(6)]
        results = run_arrivals(engine, requests)
        for i, (_, prompt, _params) in enumerate(requests):
            assert list(results[i].token_ids) == greedy_reference(tiny_model.model, prompt, 20,
                                                                  engine.eos_ids)
        engine.store.check_valid()
