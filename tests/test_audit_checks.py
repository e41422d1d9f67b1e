"""The entry invariants, answers, and the recompute judgements, over plain values."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from audit import (
    Answer,
    AuditConfigError,
    EntryFacts,
    KeyField,
    ModelState,
    Tolerance,
    UnreadableEntry,
)
from audit.checks import (
    check_canaries,
    check_material,
    check_placement,
    check_registry,
    check_served,
    check_stored,
    check_unreadable,
)
from audit.oracle import Scores, judge_exact, judge_scored
from keying import Scope, material_digest, response_digest
from tests import audit_world as w

ACME = Scope.for_tenant("acme")
TEXT = st.text(max_size=40)
CHOICE = st.fixed_dictionaries({
    "text": TEXT,
    "reasoning": TEXT,
    "finish": st.sampled_from(["stop", "length", "tool_calls"]),
    "cuts": st.lists(st.integers(min_value=0, max_value=40), max_size=4),
    "tool": st.none() | st.fixed_dictionaries({
        "name": st.from_regex(r"[a-z]{1,8}", fullmatch=True), "arguments": TEXT}),
})


def facts(**changes) -> EntryFacts:
    k = w.key_for("acme", 1)
    base = EntryFacts(
        storage_key=w.skey(k), scope=k.scope, model=k.model, version=w.VERSION, epoch=k.epoch,
        digest=bytes(k.digest), material_digest=bytes(k.material_digest), material=k.material,
        answer=Answer.of(w.response_for("hello")),
    )
    return dataclasses.replace(base, **changes)


def kinds(drafts) -> list[str]:
    return sorted(d.kind for d in drafts)


class TestAnswer:
    def test_a_stream_and_the_body_it_replays_are_the_same_answer(self):
        body = {"choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "Hello world"}}]}
        chunks = [
            {"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
            {"choices": [{"index": 0, "delta": {"content": "Hello "}}]},
            {"choices": [{"index": 0, "delta": {"content": "world"}}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        ]
        assert Answer.of(body).same_as(Answer.of(chunks))

    def test_streamed_tool_call_fragments_are_joined(self):
        chunks = [
            {"choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "id": "c1", "type": "function",
                 "function": {"name": "f", "arguments": '{"a":'}}]}}]},
            {"choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "function": {"arguments": "1}"}}]}, "finish_reason": "tool_calls"}]},
        ]
        body = {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {
                                                  "name": "f", "arguments": '{"a":1}'}}]}}]}
        assert Answer.of(chunks).same_as(Answer.of(body))

    def test_a_different_finish_reason_is_a_different_answer(self):
        a = {"choices": [{"index": 0, "finish_reason": "stop", "text": "x"}]}
        b = {"choices": [{"index": 0, "finish_reason": "length", "text": "x"}]}
        assert not Answer.of(a).same_as(Answer.of(b))


class TestStoredChecks:
    def test_a_clean_entry_has_no_findings(self):
        assert check_stored(facts(), current=w.REGISTRY[w.MODEL], canaries=w.CANARIES) == []

    def test_a_key_component_that_disagrees_with_provenance_is_named(self):
        f = facts(key_fields=(KeyField(name="scope", in_key="t/globex", in_entry="t/acme"),
                              KeyField(name="epoch", in_key="2", in_entry="1"),
                              KeyField(name="model", in_key="m", in_entry="m")))
        assert kinds(check_placement(f)) == ["cross_scope", "stale"]

    def test_material_recomputes_both_digests(self):
        assert kinds(check_material(facts(material_digest=b"\0" * 32))) == ["collision"]
        assert kinds(check_material(facts(digest=b"\0" * 16))) == ["collision"]

    def test_material_of_another_scope_is_cross_scope(self):
        other = w.key_for("globex", 1)
        f = facts(material=other.material, digest=bytes(other.digest),
                  material_digest=bytes(other.material_digest))
        assert kinds(check_material(f)) == ["cross_scope"]

    def test_material_of_another_adapter_is_a_collision(self):
        assert kinds(check_material(facts(adapter="lora-7"))) == ["collision"]

    def test_material_that_does_not_parse_is_corrupt(self):
        bad = b"\x93junk"
        f = facts(material=bad, digest=bytes(response_digest(bad)),
                  material_digest=bytes(material_digest(bad)))
        assert kinds(check_material(f)) == ["corrupt"]

    def test_without_the_secret_the_material_digest_is_not_judged(self):
        assert check_material(facts(material_digest=b"\0" * 32), secret=None) == []
        assert kinds(check_material(facts(digest=b"\0" * 16), secret=None)) == ["collision"]

    def test_without_material_nothing_is_recomputed(self):
        assert check_material(facts(material=None, material_digest=b"\0" * 32)) == []

    def test_an_entry_ahead_of_the_registry_is_stale(self):
        current = ModelState(model=w.MODEL, version="v1", epoch=1)
        assert kinds(check_registry(facts(), current)) == ["stale"]

    def test_a_current_epoch_with_another_version_is_stale(self):
        current = ModelState(model=w.MODEL, version="v9", epoch=w.EPOCH)
        assert check_registry(facts(), current)[0].evidence["registry_version"] == "v9"

    def test_an_older_epoch_is_not_a_finding(self):
        current = ModelState(model=w.MODEL, version="v3", epoch=w.EPOCH + 1)
        assert check_registry(facts(), current) == []

    @pytest.mark.parametrize("epoch", [0, 5])
    def test_a_model_the_registry_has_no_state_for_is_stale_at_any_epoch(self, epoch):
        """No epoch is constant: not even 0 is one this registry issued."""
        assert kinds(check_registry(facts(epoch=epoch), None)) == ["stale"]

    def test_an_unreadable_entry_is_corrupt_with_its_reason(self):
        d = check_unreadable(UnreadableEntry(storage_key="k", reason="foreign", error="magic"))
        assert d[0].kind == "corrupt" and d[0].evidence["reason"] == "foreign"


class TestCanaries:
    def test_another_tenants_canary_is_a_finding_that_does_not_repeat_it(self):
        found = check_canaries(f"x {w.CANARIES['globex'][0]} y", owner=ACME, canaries=w.CANARIES)
        assert kinds(found) == ["canary"]
        assert w.CANARIES["globex"][0] not in repr(found[0].evidence)

    def test_a_tenants_own_canary_is_expected(self):
        assert check_canaries(w.CANARIES["acme"][0], owner=ACME, canaries=w.CANARIES) == []

    def test_any_tenants_canary_in_a_public_entry_is_a_leak(self):
        assert kinds(check_canaries(w.CANARIES["acme"][0], owner=Scope.public(),
                                    canaries=w.CANARIES)) == ["canary"]


class TestServedChecks:
    def served(self, f: EntryFacts, **kw):
        k = w.key_for("acme", 1)
        args = dict(key=k, scope=ACME, expected_model=w.MODEL, expected_version=w.VERSION,
                    expected_epoch=w.EPOCH, served=f.answer)
        args.update(kw)
        return check_served(f, **args)

    def test_a_clean_hit_has_no_findings(self):
        assert self.served(facts()) == []

    def test_an_entry_of_another_scope_is_cross_scope(self):
        assert "cross_scope" in kinds(self.served(facts(scope=Scope.for_tenant("globex"))))

    def test_another_material_digest_is_a_collision(self):
        assert kinds(self.served(facts(material_digest=b"\1" * 32))) == ["collision"]

    def test_an_epoch_other_than_the_registrys_is_stale(self):
        assert kinds(self.served(facts(), expected_epoch=w.EPOCH + 1)) == ["stale"]

    def test_a_served_answer_that_is_not_the_stored_one_is_a_mismatch(self):
        assert kinds(self.served(facts(),
                                 served=Answer.of(w.response_for("other")))) == ["mismatch"]


class TestJudgements:
    def test_an_exact_recompute_that_differs_is_a_mismatch_with_where_it_diverged(self):
        d = judge_exact(Answer.of(w.response_for("abcX")), Answer.of(w.response_for("abcY")))
        assert d is not None and d.evidence["first_divergence_char"] == 3

    def test_an_exact_recompute_that_agrees_passes(self):
        assert judge_exact(Answer.of(w.response_for("a")), Answer.of(w.response_for("a"))) is None

    def test_numeric_noise_passes_the_scored_check(self):
        fresh = Scores(prompted=[-0.5, -1.0, -0.2, -0.8, -0.3], neutral=[-2.0] * 5)
        cached = Scores(prompted=[x - 1e-3 for x in fresh.prompted], neutral=[-2.0] * 5)
        verdict, draft, _ = judge_scored(cached, fresh, Tolerance())
        assert verdict == "pass" and draft is None

    def test_an_answer_the_prompt_does_not_explain_is_a_mismatch(self):
        # Fluent but off-topic: no more surprising than a fresh answer, yet the request's prompt
        # explains it worse than an empty prompt does.
        fresh = Scores(prompted=[-1.0] * 8, neutral=[-2.0] * 8)
        cached = Scores(prompted=[-1.5] * 8, neutral=[-1.2] * 8)
        verdict, draft, evidence = judge_scored(cached, fresh, Tolerance())
        assert verdict == "finding" and draft is not None and draft.kind == "mismatch"
        assert evidence["reasons"] == ["the prompt does not explain it"]

    def test_a_fresh_sample_far_from_another_is_still_sampling_spread(self):
        # Seen on SmolLM2 at temperature 0.7: two fresh samples 2.2 nats/token apart, both
        # explained by the prompt. A margin of 2.0 flagged it.
        fresh = Scores(prompted=[-0.37] * 12, neutral=[-1.6] * 12)
        cached = Scores(prompted=[-2.59] * 12, neutral=[-3.5] * 12)
        verdict, draft, _ = judge_scored(cached, fresh, Tolerance())
        assert (verdict, draft) == ("pass", None)

    def test_gibberish_is_far_more_surprising_than_a_fresh_answer(self):
        fresh = Scores(prompted=[-0.5] * 8, neutral=[-1.5] * 8)
        cached = Scores(prompted=[-9.0] * 8, neutral=[-10.0] * 8)
        verdict, _, evidence = judge_scored(cached, fresh, Tolerance())
        assert verdict == "finding"
        assert evidence["reasons"] == ["far more surprising than a fresh answer"]

    def test_a_model_whose_answers_ignore_the_prompt_does_not_flag_its_own(self):
        # Random weights: every gain is ~0, for fresh and cached answers alike.
        fresh = Scores(prompted=[-5.5] * 8, neutral=[-5.5] * 8)
        cached = Scores(prompted=[-5.52] * 8, neutral=[-5.5] * 8)
        assert judge_scored(cached, fresh, Tolerance())[0] == "pass"

    def test_too_few_tokens_are_undecided(self):
        s = Scores(prompted=[-9.0], neutral=[-9.0])
        assert judge_scored(s, s, Tolerance())[0] == "undecided"

    def test_an_oracle_that_cannot_score_leaves_it_undecided(self):
        s = Scores(prompted=None, neutral=None)
        assert judge_scored(s, s, Tolerance())[0] == "undecided"

    def test_a_negative_margin_is_refused_naming_the_setting(self):
        with pytest.raises(AuditConfigError, match="nll_margin"):
            Tolerance(nll_margin=-1)


class TestAnswerProperties:
    """However a response is split into stream chunks, it is the same answer as its body."""

    @given(choices=st.lists(CHOICE, min_size=1, max_size=3))
    def test_a_stream_split_anywhere_equals_its_body(self, choices):
        body = {"choices": []}
        chunks = []
        for i, c in enumerate(choices):
            message = {"role": "assistant", "content": c["text"]}
            if c["reasoning"]:
                message["reasoning_content"] = c["reasoning"]
            if c["tool"]:
                message["tool_calls"] = [{"id": f"call{i}", "type": "function",
                                          "function": dict(c["tool"])}]
            body["choices"].append({"index": i, "finish_reason": c["finish"], "message": message})
            cuts = sorted({0, len(c["text"]), *[min(x, len(c["text"])) for x in c["cuts"]]})
            chunks.append({"choices": [{"index": i, "delta": {"role": "assistant"}}]})
            for a, b in itertools.pairwise(cuts):
                chunks.append({"choices": [{"index": i, "delta": {"content": c["text"][a:b]}}]})
            if c["reasoning"]:
                chunks.append({"choices": [{"index": i,
                                            "delta": {"reasoning_content": c["reasoning"]}}]})
            if c["tool"]:
                args = c["tool"]["arguments"]
                half = len(args) // 2
                chunks.append({"choices": [{"index": i, "delta": {"tool_calls": [
                    {"index": 0, "id": f"call{i}", "type": "function",
                     "function": {"name": c["tool"]["name"], "arguments": args[:half]}}]}}]})
                chunks.append({"choices": [{"index": i, "delta": {"tool_calls": [
                    {"index": 0, "function": {"arguments": args[half:]}}]}}]})
            chunks.append({"choices": [{"index": i, "delta": {}, "finish_reason": c["finish"]}]})
        assert Answer.of(chunks).same_as(Answer.of(body))

    @given(a=TEXT, b=TEXT)
    def test_answers_differ_exactly_when_their_texts_differ(self, a, b):
        one = Answer.of(w.response_for(a))
        two = Answer.of(w.response_for(b))
        assert one.same_as(two) == (a == b)
