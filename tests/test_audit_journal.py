"""Findings are durable: the file and Redis-stream journals, and the recorder over them."""

from __future__ import annotations

import json
import os

import pytest
import redis
from prometheus_client import REGISTRY

from audit import EntryRef, FileJournal, Finding, FindingsLogError, Recorder, RedisJournal


def finding(i: int, *, kind: str = "stale", at: float | None = None) -> Finding:
    return Finding(kind=kind, source="scan", at=1000.0 + i if at is None else at,
                   summary=f"finding {i}",
                   entry=EntryRef(storage_key=f"llmc:v1:t/a:m:e1:{i:032x}", scope="tenant:a",
                                  model="m", epoch=1),
                   evidence={"entry_epoch": 1, "registry_epoch": 2})


class TestFinding:
    def test_a_finding_round_trips_through_its_dict_form(self):
        f = finding(1, kind="canary")
        assert Finding.from_dict(json.loads(json.dumps(f.as_dict()))) == f

    def test_an_unknown_kind_is_refused(self):
        with pytest.raises(ValueError, match="finding kind 'weird'"):
            Finding(kind="weird", source="scan", at=0.0, summary="", entry=EntryRef(),  # type: ignore[arg-type]
                    evidence={})


class TestFileJournal:
    def test_appended_findings_read_back_in_time_order(self, tmp_path):
        j = FileJournal(tmp_path / "a" / "findings.jsonl")
        for i in (3, 1, 2):
            j.append(finding(i))
        assert [f.summary for f in j.findings()] == ["finding 1", "finding 2", "finding 3"]

    def test_since_keeps_only_findings_at_or_after_it(self, tmp_path):
        j = FileJournal(tmp_path / "f.jsonl")
        for i in range(5):
            j.append(finding(i))
        assert [f.at for f in j.findings(since=1003.0)] == [1003.0, 1004.0]

    def test_a_torn_last_line_is_skipped_and_counted(self, tmp_path):
        j = FileJournal(tmp_path / "f.jsonl")
        j.append(finding(1))
        with open(j.path, "a") as fh:
            fh.write('{"id": "abc", "kind": "sta')
        assert len(j.findings()) == 1
        assert j.torn_lines == 1

    def test_findings_survive_a_new_journal_on_the_same_file(self, tmp_path):
        FileJournal(tmp_path / "f.jsonl").append(finding(1))
        assert FileJournal(tmp_path / "f.jsonl").findings()[0].summary == "finding 1"

    def test_results_are_replaced_whole(self, tmp_path):
        j = FileJournal(tmp_path / "f.jsonl")
        j.save_result("scan", {"entries": 1})
        j.save_result("scan", {"entries": 2})
        assert j.load_result("scan") == {"entries": 2}
        assert j.load_result("timing") is None
        assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]

    def test_an_unknown_result_name_is_refused(self, tmp_path):
        with pytest.raises(ValueError, match="result name 'other'"):
            FileJournal(tmp_path / "f.jsonl").save_result("other", {})

    def test_an_unwritable_path_names_the_setting(self, tmp_path):
        blocker = tmp_path / "file"
        blocker.write_text("")
        with pytest.raises(FindingsLogError, match="findings_path"):
            FileJournal(blocker / "sub" / "f.jsonl")


@pytest.mark.redis
class TestRedisJournal:
    def test_findings_read_back_across_pages(self, redis_url):
        j = RedisJournal(redis.Redis.from_url(redis_url), page=3)
        for i in range(10):
            j.append(finding(i))
        assert [f.summary for f in j.findings()] == [f"finding {i}" for i in range(10)]
        j.close()

    def test_since_filters_by_the_findings_time(self, redis_url):
        import time

        now = time.time()
        j = RedisJournal(redis.Redis.from_url(redis_url))
        j.append(finding(1, at=now - 100))
        j.append(finding(2, at=now))
        assert [f.summary for f in j.findings(since=now - 1)] == ["finding 2"]

    def test_results_live_beside_the_stream(self, redis_url):
        j = RedisJournal(redis.Redis.from_url(redis_url))
        j.save_result("timing", {"leaks": ["other_tenant"]})
        assert j.load_result("timing") == {"leaks": ["other_tenant"]}

    def test_every_key_shares_one_hash_slot_on_a_cluster(self, redis_cluster):
        from redis.cluster import ClusterNode, RedisCluster

        client = RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in redis_cluster.startup_nodes])
        j = RedisJournal(client)
        j.append(finding(1))
        j.save_result("scan", {"entries": 3})
        assert j.findings()[0].summary == "finding 1"
        assert j.load_result("scan") == {"entries": 3}
        client.close()

    def test_a_dead_server_is_a_findings_log_error(self, redis_server_factory):
        server = redis_server_factory()
        j = RedisJournal(redis.Redis.from_url(server.url, socket_timeout=0.5,
                                              socket_connect_timeout=0.5))
        server.kill()
        with pytest.raises(FindingsLogError, match="check \\[redis\\] url"):
            j.append(finding(1))


@pytest.mark.redis
class TestTheServicesJournal:
    """The journal the service and the CLI open lives in the deployment ``[redis]`` names."""

    def test_a_cluster_given_by_nodes_keeps_its_journal_in_the_cluster(self, redis_cluster,
                                                                       tmp_path):
        from redis.cluster import ClusterNode, RedisCluster

        from cachesvc.auditing import journal_for
        from tests.service_helpers import make_settings

        nodes = [f"{h}:{p}" for h, p in redis_cluster.startup_nodes]
        settings = make_settings(tmp_path, redis={"nodes": nodes})
        j = journal_for(settings.redis, tmp_path / "findings.jsonl")
        j.append(finding(1))
        client = RedisCluster(startup_nodes=[ClusterNode(h, p)
                                             for h, p in redis_cluster.startup_nodes])
        try:
            assert [f.summary for f in RedisJournal(client).findings()] == ["finding 1"]
        finally:
            client.close()
        assert not (tmp_path / "findings.jsonl").exists()

    def test_a_cluster_url_with_credentials_writes_as_that_user(self, redis_cluster, tmp_path):
        from cachesvc.auditing import open_journal

        admins = [redis.Redis(host=h, port=p) for h, p in redis_cluster.startup_nodes]
        for admin in admins:
            admin.acl_setuser("auditor", enabled=True, passwords=["+s3cret-pw"],
                              keys=["*"], commands=["+@all"])
        host, port = redis_cluster.startup_nodes[0]
        try:
            j = open_journal(redis_url=f"redis+cluster://auditor:s3cret-pw@{host}:{port}",
                             findings_path=tmp_path / "findings.jsonl")
            j.append(finding(1))
            assert [f.summary for f in j.findings()] == ["finding 1"]
            # The node holding the stream sees the journal's connection as the URL's user.
            users = {c["user"] for a in admins for c in a.client_list()}
            assert "auditor" in users
            with pytest.raises(FindingsLogError, match="credentials"):
                open_journal(redis_url=f"redis+cluster://auditor:wrong@{host}:{port}",
                             findings_path=tmp_path / "findings.jsonl")
            assert not (tmp_path / "findings.jsonl").exists()
        finally:
            for admin in admins:
                admin.acl_deluser("auditor")
                admin.close()


def _count(kind: str, source: str) -> float:
    return REGISTRY.get_sample_value("llmcache_audit_findings_total",
                                     {"kind": kind, "source": source}) or 0.0


class TestRecorder:
    def test_a_recorded_finding_is_stored_and_counted(self, tmp_path):
        before = _count("canary", "scan")
        rec = Recorder(FileJournal(tmp_path / "f.jsonl"))
        rec.record(finding(1, kind="canary"))
        assert _count("canary", "scan") == before + 1
        assert len(FileJournal(tmp_path / "f.jsonl").findings()) == 1

    @pytest.mark.redis
    def test_findings_recorded_while_redis_is_down_are_stored_when_it_returns(
        self, redis_server_factory
    ):
        server = redis_server_factory()
        client = redis.Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        rec = Recorder(RedisJournal(client))
        server.stop()
        rec.record(finding(1))
        rec.record(finding(2))
        assert rec.pending == 2
        server.restart()
        assert rec.flush() is True
        assert [f.summary for f in RedisJournal(client).findings()] == ["finding 1", "finding 2"]

    @pytest.mark.redis
    def test_close_moves_what_redis_never_took_to_the_fallback_file(
        self, redis_server_factory, tmp_path
    ):
        server = redis_server_factory()
        client = redis.Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        rec = Recorder(RedisJournal(client), fallback=FileJournal(tmp_path / "fallback.jsonl"))
        server.kill()
        rec.record(finding(7))
        rec.close()
        assert [f.summary for f in FileJournal(tmp_path / "fallback.jsonl").findings()] == [
            "finding 7"]
