"""Reuse is exact: logits with cached prefix blocks equal a full forward pass, and greedy
generations are identical with and without reuse."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_prefix.engine import Engine, GenerationParams
from gpu_prefix.models import LoadedModel


def reuse_logits(engine: Engine, ids: list[int],
                 cached_prompt: list[int]) -> tuple[torch.Tensor, int]:
    """Store ``cached_prompt``'s blocks, then run ``ids`` through the engine reusing them;
    returns the logits of every position after the cached blocks, and how many tokens were
    cached."""
    salt = engine.scope_salt_for("t")
    engine.generate(cached_prompt, GenerationParams(max_tokens=1, temperature=0.0, scope_salt=salt))
    bs = engine.pool.block_size
    start = min(len(cached_prompt), len(ids) - 1) // bs * bs
    seq = engine._logits_seq(ids, start, salt, True)
    rows = engine._wait(seq)
    return rows, seq.cached_tokens or 0


def full_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0]


class TestReuseIsExact:
    @settings(max_examples=20, deadline=None)
    @given(seed=st.integers(0, 2**32 - 1), prefix_len=st.integers(1, 120),
           suffix_len=st.integers(1, 40))
    def test_logits_with_reuse_equal_a_full_forward(self, tiny_model: LoadedModel, seed,
                                                    prefix_len, suffix_len):
        engine = Engine(tiny_model, pool_bytes=2**20)
        rng = random.Random(seed)
        ids = [rng.randrange(engine.vocab_size) for _ in range(prefix_len + suffix_len)]
        out, cached = reuse_logits(engine, ids, ids[:prefix_len])
        full = full_logits(engine.model, ids)[cached:]
        assert cached == min(prefix_len, len(ids) - 1) // 16 * 16
        assert (out - full).abs().max().item() < 1e-4
        engine.store.check_valid()

    @settings(max_examples=10, deadline=None)
    @given(seed=st.integers(0, 2**32 - 1), n_prefix=st.integers(17, 90))
    def test_greedy_generations_are_identical_with_and_without_reuse(self, tiny_model: LoadedModel,
                                                                     seed, n_prefix):
        engine = Engine(tiny_model, pool_bytes=2**20)
        rng = random.Random(seed)
        prefix = [rng.randrange(engine.vocab_size) for _ in range(n_prefix)]
        salt = engine.scope_salt_for("t")
        engine.generate(prefix + [1, 2, 3],
                        GenerationParams(max_tokens=1, temperature=0.0, scope_salt=salt))
        prompt = prefix + [rng.randrange(engine.vocab_size) for _ in range(5)]
        fresh = engine.generate(prompt,
                                GenerationParams(max_tokens=24, temperature=0.0,
                                                 use_prefix_cache=False))
        reused = engine.generate(prompt,
                                 GenerationParams(max_tokens=24, temperature=0.0, scope_salt=salt))
        assert reused.cached_tokens >= 16 and fresh.cached_tokens == 0
        assert reused.token_ids == fresh.token_ids
        assert max((abs(a - b) for a, b in zip(reused.logprobs, fresh.logprobs, strict=True)),
                   default=0.0) < 1e-4

    def test_the_whole_prompt_cached_still_runs_its_last_token(self, tiny_engine: Engine):
        prompt = list(range(32))  # exactly two blocks
        salt = tiny_engine.scope_salt_for("t")
        a = tiny_engine.generate(prompt,
                                 GenerationParams(max_tokens=8, temperature=0.0, scope_salt=salt))
        b = tiny_engine.generate(prompt,
                                 GenerationParams(max_tokens=8, temperature=0.0, scope_salt=salt))
        assert b.cached_tokens == 16 and a.token_ids == b.token_ids


@pytest.mark.slow
class TestReuseOnSmolLM2:
    def test_smollm2_logits_with_reuse_equal_a_full_forward_and_greedy_matches(self):
        from gpu_prefix.models import load_model

        engine = Engine(load_model("smollm2"), pool_bytes=64 * 2**20)
        rng = random.Random(7)
        ids = [rng.randrange(1000, 20000) for _ in range(200)]
        out, cached = reuse_logits(engine, ids, ids[:150])
        assert cached == 144
        assert (out - full_logits(engine.model, ids)[cached:]).abs().max().item() < 1e-4
        prompt = engine.chat_prompt_ids([{"role": "user",
                                          "content": "Name three colours of the rainbow."}])
        fresh = engine.generate(prompt,
                                GenerationParams(max_tokens=12, temperature=0.0,
                                                 use_prefix_cache=False))
        salt = engine.scope_salt_for("t")
        engine.generate(prompt, GenerationParams(max_tokens=1, temperature=0.0, scope_salt=salt))
        reused = engine.generate(prompt,
                                 GenerationParams(max_tokens=12, temperature=0.0, scope_salt=salt))
        assert reused.cached_tokens > 0 and reused.token_ids == fresh.token_ids
        assert fresh.text.strip()


@pytest.mark.gpu
class TestReuseOnCuda:
    def test_reuse_on_cuda_equals_a_full_forward_and_the_cpu_answer(self, tiny_model: LoadedModel):
        from gpu_prefix.models import load_model

        engine = Engine(load_model("random-tiny", device="cuda"), pool_bytes=2**20)
        assert engine.pool.tensor.is_cuda
        rng = random.Random(3)
        ids = [rng.randrange(engine.vocab_size) for _ in range(150)]
        out, cached = reuse_logits(engine, ids, ids[:100])
        with torch.inference_mode():
            full = engine.model(input_ids=torch.tensor([ids], device="cuda")).logits[0]
        assert cached == 96 and (out - full[cached:]).abs().max().item() < 1e-4
        cpu = Engine(tiny_model, pool_bytes=2**20)
        p = GenerationParams(max_tokens=12, temperature=0.0)
        assert engine.generate(ids, p).token_ids == cpu.generate(ids, p).token_ids
