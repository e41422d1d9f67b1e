"""The planted-fault suite: forged entries in a real store are found by the offline scan and,
at its sample rate, by the shadow auditor; clean entries are never flagged."""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from audit import FileJournal, Recorder, Scanner, ShadowAuditor, ShadowConfig
from cachesvc.auditing import scan_items
from cachesvc.store import open_store
from tests import audit_world as w

N_CLEAN = 60  # per tenant


async def _fill(store, planted) -> dict[str, bytes]:
    stored: dict[str, bytes] = {}
    for key, raw, _ in w.clean_entries(N_CLEAN):
        await store.set(key, raw, ttl=3600)
        stored[key] = raw
    for p in planted:
        key = w.skey(w.key_for(p.tenant, p.index))
        await store.set(key, p.raw, ttl=3600)
        stored[key] = p.raw
    return stored


def _scan(store, journal_path: Path, *, oracle=None, **kw):
    recorder = Recorder(FileJournal(journal_path))
    scanner = Scanner(recorder=recorder, registry=w.REGISTRY, canaries=w.CANARIES,
                      clock=lambda: w.NOW, oracle=oracle, **kw)
    seen = []
    result = asyncio.run(scanner.run(scan_items(store, w.READER), progress=seen.append))
    recorder.close()
    return result, FileJournal(journal_path).findings(), seen


def _kinds_by_key(findings) -> dict[str, set[str]]:
    by_key: dict[str, set[str]] = defaultdict(set)
    for f in findings:
        by_key[f.entry.storage_key].add(f.kind)
    return by_key


def _planted_key(p) -> str:
    return w.skey(w.key_for(p.tenant, p.index))


@pytest.fixture(params=["embedded", pytest.param("redis", marks=pytest.mark.redis),
                        pytest.param("cluster", marks=pytest.mark.redis)])
def store_url(request):
    if request.param == "embedded":
        return None
    if request.param == "redis":
        return request.getfixturevalue("redis_url")
    return request.getfixturevalue("redis_cluster_url")


class TestScanFindsPlantedFaults:
    def test_the_scan_finds_every_planted_fault_and_no_clean_entry(self, store_url, tmp_path):
        planted = w.plant_faults(N_CLEAN)
        if store_url is None:
            store = open_store(None)
            asyncio.run(_fill(store, planted))
        else:
            async def fill():
                s = open_store(store_url)
                await _fill(s, planted)
                await s.close()
            asyncio.run(fill())
            store = open_store(store_url)
        oracle = w.DeterministicOracle()
        result, findings, progress = _scan(store, tmp_path / "f.jsonl", oracle=oracle)
        by_key = _kinds_by_key(findings)
        for p in planted:
            assert p.scan_kinds, p.name
            assert p.scan_kinds <= by_key.get(_planted_key(p), set()), (
                p.name, by_key.get(_planted_key(p)))
        planted_keys = {_planted_key(p) for p in planted}
        false_positives = {k: v for k, v in by_key.items() if k not in planted_keys}
        assert false_positives == {}
        assert result.entries == 2 * N_CLEAN + len(planted)
        assert progress[-1] == result.entries
        assert result.unreadable == 1  # the flipped-bytes entry
        assert result.material_checked == result.entries - 1
        # Every clean entry and the wrong answer were recomputed (the others already had a
        # finding, so the scan spends no model call on them); each clean one passed.
        assert result.recomputed["pass"] == 2 * N_CLEAN
        assert result.recomputed["finding"] == 1
        assert result.recomputed["skipped_other_finding"] == len(planted) - 2  # -1 unreadable
        assert oracle.calls == 2 * N_CLEAN + 1
        if store_url is not None and store_url.startswith("redis+cluster"):
            assert len(result.entries_by_node) == 3  # every node walked, each entry placed
            assert all(f.entry.node for f in findings)

    def test_without_an_oracle_only_the_wrong_answers_go_unseen(self, tmp_path):
        planted = w.plant_faults(N_CLEAN)
        store = open_store(None)
        asyncio.run(_fill(store, planted))
        result, findings, _ = _scan(store, tmp_path / "f.jsonl")
        by_key = _kinds_by_key(findings)
        for p in planted:
            assert p.scan_kinds - {"mismatch"} <= by_key.get(_planted_key(p), set()), p.name
        assert "wrong_answer" not in {p.name for p in planted
                                      if by_key.get(_planted_key(p))}
        assert result.recomputed == {}

    def test_a_wrong_material_digest_is_a_collision_naming_both_digests(self, tmp_path):
        (p,) = [p for p in w.plant_faults(N_CLEAN) if p.name == "material_digest"]
        store = open_store(None)
        asyncio.run(_fill(store, [p]))
        _, findings, _ = _scan(store, tmp_path / "f.jsonl")
        (finding,) = [f for f in findings if f.entry.storage_key == _planted_key(p)]
        assert finding.kind == "collision"
        assert set(finding.evidence) == {"stored", "recomputed"}

    def test_without_the_secret_material_digests_are_skipped_not_flagged(self, tmp_path):
        planted = [p for p in w.plant_faults(N_CLEAN) if p.name == "material_digest"]
        store = open_store(None)
        asyncio.run(_fill(store, planted))
        result, findings, _ = _scan(store, tmp_path / "f.jsonl", secret=None)
        assert findings == []
        assert not result.material_digest_checked
        result, findings, _ = _scan(store, tmp_path / "g.jsonl", secret=b"another-secret" * 3)
        assert len(findings) == result.material_checked == 2 * N_CLEAN + 1  # all "forged"

    def test_entries_without_material_get_every_other_check(self, tmp_path):
        store = open_store(None)
        k = w.key_for("acme", 1)
        other = w.key_for("globex", 1)
        asyncio.run(store.set(w.skey(k),
                              w.encode_entry(w.entry_for(k, material=False), keys=w.KEYS)))
        asyncio.run(store.set(w.skey(w.key_for("acme", 2)),
                              w.encode_entry(w.entry_for(other, material=False), keys=w.KEYS)))
        oracle = w.DeterministicOracle()
        result, findings, _ = _scan(store, tmp_path / "f.jsonl", oracle=oracle)
        assert {f.kind for f in findings} == {"cross_scope", "collision"}  # scope and digest
        assert result.material_checked == 0
        assert result.recomputed == {"skipped_no_material": 1, "skipped_other_finding": 1}
        assert oracle.calls == 0

    def test_altered_material_is_a_finding_not_a_crash(self, tmp_path):
        store = open_store(None)
        k = w.key_for("acme", 1)
        bad = w.replace(w.entry_for(k), material=b"\x97not material")
        asyncio.run(store.set(w.skey(k), w.encode_entry(bad, keys=w.KEYS)))
        _, findings, _ = _scan(store, tmp_path / "f.jsonl", oracle=w.DeterministicOracle())
        assert {f.kind for f in findings} == {"collision", "corrupt"}

    def test_an_entry_of_an_old_epoch_under_its_own_key_is_reclaimable_not_a_finding(
        self, tmp_path):
        store = open_store(None)
        old = w.key_for("acme", 1, epoch=w.OLD_EPOCH)
        asyncio.run(store.set(w.skey(old),
                              w.encode_entry(w.entry_for(old, version=w.OLD_VERSION), keys=w.KEYS)))
        oracle = w.DeterministicOracle()
        result, findings, _ = _scan(store, tmp_path / "f.jsonl", oracle=oracle)
        assert findings == []
        assert result.reclaimable == 1
        assert result.recomputed == {"skipped_old_epoch": 1}
        assert oracle.calls == 0


def _shadow(journal_path: Path, rate: float, seed: int, oracle=None):
    recorder = Recorder(FileJournal(journal_path, fsync=False))
    return ShadowAuditor(
        recorder=recorder, convert=w.READER.sample,
        config=ShadowConfig(sample_rate=rate, queue_size=100_000, canaries=w.CANARIES,
                            recompute_budget=1.0),
        oracle=oracle or w.DeterministicOracle(), registry=w.StaticRegistry(w.REGISTRY),
        rng=random.Random(seed), clock=lambda: w.NOW,
    )


class TestShadowAuditorFindsPlantedFaults:
    def test_each_fault_is_found_at_the_sample_rate_over_many_hits(self, tmp_path):
        planted = w.plant_faults(N_CLEAN)
        store = open_store(None)
        stored = asyncio.run(_fill(store, planted))
        rate, hits_per_fault = 0.2, 150
        auditor = _shadow(tmp_path / "f.jsonl", rate, seed=7)
        auditor.start()
        order = [(p.tenant, p.index) for p in planted] * hits_per_fault
        random.Random(1).shuffle(order)
        for tenant, i in order:
            raw = stored[w.skey(w.key_for(tenant, i))]
            auditor.offer(w.hit_event(tenant, i, raw))
        auditor.drain(timeout=60)
        auditor.check_valid()
        auditor.stop()
        findings = FileJournal(tmp_path / "f.jsonl").findings()
        flagged_hits: dict[str, set[str]] = defaultdict(set)
        per_key_kind: Counter[tuple[str, str]] = Counter()
        for f in findings:
            flagged_hits[f.entry.storage_key].add(f.kind)
            per_key_kind[(f.entry.storage_key, f.kind)] += 1
        for p in planted:
            key = w.skey(w.key_for(p.tenant, p.index))
            assert p.shadow_kinds <= flagged_hits[key], (p.name, flagged_hits[key])
            # Each sampled hit on a faulty entry yields one finding of each expected kind:
            # Binomial(150, 0.2) has mean 30 and sd ~4.9; 10..50 is a four-sigma band.
            for kind in p.shadow_kinds:
                assert 10 <= per_key_kind[(key, kind)] <= 50, (p.name, kind,
                                                               per_key_kind[(key, kind)])
        assert auditor.enqueued + auditor.skipped == len(order)

    def test_no_clean_hit_is_flagged_over_thousands_of_hits(self, tmp_path):
        clean = w.clean_entries(N_CLEAN)
        oracle = w.DeterministicOracle()
        auditor = _shadow(tmp_path / "f.jsonl", 1.0, seed=3, oracle=oracle)
        auditor.start()
        rng = random.Random(5)
        hits = 3000
        for _ in range(hits):
            _key, raw, k = rng.choice(clean)
            tenant = k.scope.tenant
            i = int(k.canonical.fields["messages"][0]["content"].rsplit(" ", 1)[1])
            auditor.offer(w.hit_event(tenant, i, raw))
        auditor.drain(timeout=120)
        auditor.stop()
        assert auditor.checked == hits
        assert oracle.calls == hits  # every hit was recomputed, not just looked at
        assert FileJournal(tmp_path / "f.jsonl").findings() == []
