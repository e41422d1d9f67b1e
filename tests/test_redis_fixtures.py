"""The Redis fixtures start real servers, and can kill, pause and restart them."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import redis
from redis.cluster import ClusterNode
from redis.cluster import RedisCluster as SyncCluster

from tests.support.redis_cluster import RedisCluster
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.redis


class TestStandaloneFixture:
    def test_server_answers_and_is_empty_for_each_test(self, redis_standalone: RedisServer) -> None:
        client = redis.Redis.from_url(redis_standalone.url)
        assert client.dbsize() == 0
        client.set("k", "v")
        assert client.get("k") == b"v"

    def test_the_previous_test_left_nothing_behind(self, redis_standalone: RedisServer) -> None:
        assert redis.Redis.from_url(redis_standalone.url).dbsize() == 0

    def test_kill_makes_the_port_refuse_and_restart_brings_it_back(
        self, redis_standalone: RedisServer
    ) -> None:
        pid = redis_standalone.pid
        redis_standalone.kill()
        assert not redis_standalone.alive
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", redis_standalone.port), timeout=0.5).close()
        redis_standalone.restart()
        assert redis_standalone.pid != pid
        assert redis.Redis.from_url(redis_standalone.url).ping()

    def test_a_server_restarted_from_a_thread_outlives_that_thread(
        self, redis_standalone: RedisServer
    ) -> None:
        """Chaos threads restart servers; the server must not die when the thread ends."""
        redis_standalone.kill()
        worker = threading.Thread(target=redis_standalone.restart)
        worker.start()
        worker.join()
        time.sleep(0.3)  # a server tied to the dead thread would be SIGKILLed by now
        assert redis_standalone.alive
        assert redis.Redis.from_url(redis_standalone.url).ping()

    def test_pause_makes_commands_time_out_until_resumed(
        self, redis_standalone: RedisServer
    ) -> None:
        redis_standalone.pause()
        client = redis.Redis.from_url(redis_standalone.url, socket_timeout=0.2)
        with pytest.raises(redis.exceptions.TimeoutError):
            client.ping()
        redis_standalone.resume()
        assert redis.Redis.from_url(redis_standalone.url).ping()

    def test_a_killed_server_is_healthy_again_in_the_next_test_part1(
        self, redis_standalone: RedisServer
    ) -> None:
        redis_standalone.kill()

    def test_a_killed_server_is_healthy_again_in_the_next_test_part2(
        self, redis_standalone: RedisServer
    ) -> None:
        assert redis.Redis.from_url(redis_standalone.url).ping()


class TestClusterFixture:
    def _client(self, cluster: RedisCluster) -> SyncCluster:
        return SyncCluster(startup_nodes=[ClusterNode(h, p) for h, p in cluster.startup_nodes])

    def test_three_masters_cover_every_slot(self, redis_cluster: RedisCluster) -> None:
        client = self._client(redis_cluster)
        masters = client.get_primaries()
        assert len(masters) == 3
        for i in range(200):
            client.set(f"key-{i}", i)
        per_node = [n.command("DBSIZE") for n in redis_cluster.nodes]
        assert all(reply != 0 for reply in per_node), per_node

    def test_each_test_starts_with_an_empty_cluster(self, redis_cluster: RedisCluster) -> None:
        assert all(n.command("DBSIZE") == 0 for n in redis_cluster.nodes)

    def test_a_killed_node_rejoins_with_its_slots(self, redis_cluster: RedisCluster) -> None:
        redis_cluster.nodes[1].kill()
        redis_cluster.restart_node(1)
        client = self._client(redis_cluster)
        for i in range(100):
            client.set(f"key-{i}", i)
        assert all(client.get(f"key-{i}") == str(i).encode() for i in range(100))
