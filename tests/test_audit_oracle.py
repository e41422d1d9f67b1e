"""Recompute through the reference engine: exact for deterministic requests, teacher-forced
scoring for sampled ones, with real models (the scored tolerance is calibrated on SmolLM2)."""

from __future__ import annotations

import random

import pytest

from audit import Answer, FileJournal, ModelState, Recorder, Sample, ShadowAuditor, ShadowConfig
from cachesvc.auditing import EngineOracle
from keying import KeyParams, Scope, build_key

PROMPTS = ["What is the capital of France?", "List three prime numbers.",
           "Explain photosynthesis in one sentence."]


def request(engine, prompt: str, *, temperature: float, max_tokens: int = 24) -> dict:
    return {"model": engine.model_id, "temperature": temperature, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": prompt}]}


def sample(engine, body: dict, answer_text: str) -> Sample:
    scope = Scope.for_tenant("acme")
    key = build_key(body, KeyParams(scope=scope, epoch=1, kind="chat", allow_nondeterministic=True))
    served = Answer.of({"choices": [{"index": 0, "finish_reason": "length",
                                     "message": {"role": "assistant", "content": answer_text}}]})
    return Sample(event="hit", tenant="acme", scope=scope, request=body, key=key,
                  expected=ModelState(model=engine.model_id, version="1", epoch=1), entry=None,
                  served=served, at=0.0)


def auditor(tmp_path, oracle) -> ShadowAuditor:
    return ShadowAuditor(recorder=Recorder(FileJournal(tmp_path / "f.jsonl", fsync=False)),
                         convert=lambda s: s,
                         config=ShadowConfig(sample_rate=1.0, recompute_budget=1.0),
                         oracle=oracle, rng=random.Random(0), clock=lambda: 0.0,
                         event_kind=lambda s: s.event)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from gpu_prefix.engine import Engine

    return Engine(tiny_model)


@pytest.fixture(scope="module")
def smollm2():
    from gpu_prefix.engine import Engine
    from gpu_prefix.models import load_model

    return Engine(load_model("smollm2"))


class TestExactRecompute:
    def test_a_greedy_answer_reproduces_and_a_changed_one_does_not(self, tiny, tmp_path):
        oracle = EngineOracle(tiny)
        body = request(tiny, "hello there", temperature=0)
        right = oracle.complete(body, "chat", tenant="acme").first_text
        a = auditor(tmp_path, oracle)
        assert a.check(sample(tiny, body, right)) == []
        found = a.check(sample(tiny, body, right[:-1] + ("x" if right[-1:] != "x" else "y")))
        assert [f.kind for f in found] == ["mismatch"]
        assert found[0].evidence["check"] == "exact"


class TestScoredRecompute:
    def test_sampled_answers_of_a_random_weight_model_are_not_flagged(self, tiny, tmp_path):
        oracle = EngineOracle(tiny)
        a = auditor(tmp_path, oracle)
        for i in range(5):
            body = request(tiny, f"prompt {i}", temperature=0.9)
            text = oracle.complete(body, "chat", tenant="acme").first_text
            assert a.check(sample(tiny, body, text)) == []

    @pytest.mark.slow
    def test_fresh_samples_pass_and_other_prompts_answers_are_flagged(self, smollm2, tmp_path):
        oracle = EngineOracle(smollm2)
        a = auditor(tmp_path, oracle)
        answers = {}
        for prompt in PROMPTS:
            body = request(smollm2, prompt, temperature=0.7)
            answers[prompt] = oracle.complete(body, "chat", tenant="acme").first_text
            text = oracle.complete(body, "chat", tenant="acme").first_text
            found = a.check(sample(smollm2, body, text))
            assert found == [], found[0].evidence if found else None
        for i, prompt in enumerate(PROMPTS):
            wrong = answers[PROMPTS[(i + 1) % len(PROMPTS)]]
            body = request(smollm2, prompt, temperature=0.7)
            found = a.check(sample(smollm2, body, wrong))
            assert [f.kind for f in found] == ["mismatch"], prompt
            assert found[0].evidence["check"] == "scored"
