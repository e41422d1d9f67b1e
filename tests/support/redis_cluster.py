"""A 3-master Redis Cluster of real ``redis-server`` processes, for tests and benchmarks."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from tests.support.redis_servers import HOST, RedisServer, free_port, redis_cli, start_server


@dataclass
class RedisCluster:
    """A 3-master Redis Cluster (no replicas) owned by the test session."""

    nodes: list[RedisServer]
    cli: str | None

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(HOST, n.port) for n in self.nodes]

    @property
    def url(self) -> str:
        return f"redis+cluster://{HOST}:{self.nodes[0].port}"

    def _state_ok(self, node: RedisServer) -> bool:
        try:
            with node.client(1.0) as c:
                info = c.cluster("INFO")
        except (redis.RedisError, OSError):
            return False
        return (info.get("cluster_state") == "ok"
                and str(info.get("cluster_slots_assigned")) == "16384")

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every node is alive and reports cluster_state:ok with all slots assigned."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(n.alive and not n.paused and self._state_ok(n) for n in self.nodes):
                return
            time.sleep(0.1)
        raise RuntimeError(
            "redis cluster did not reach cluster_state:ok; "
            + "; ".join(f"{n.port}: {n.log_tail(300)}" for n in self.nodes)
        )

    def restart_node(self, index: int) -> None:
        """Restart node ``index`` (killed or not) and wait until the cluster is ok again.

        The node keeps its ``nodes.conf`` in its directory, so it rejoins with its old slots.
        """
        node = self.nodes[index]
        node.restart()
        self.wait_ok()

    def ensure_healthy(self) -> None:
        for i, node in enumerate(self.nodes):
            if node.paused:
                node.resume()
            if not node.alive or not node.ping():
                self.restart_node(i)
        self.wait_ok()

    def flushall(self) -> None:
        for node in self.nodes:
            node.flushall()

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()


def server_version(binary: str) -> tuple[int, int]:
    """``(major, minor)`` of a redis-server binary (0, 0 if unknown)."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return (0, 0)
    for word in out.stdout.split():
        if word.startswith("v="):
            major, minor, *_ = (word[2:].split(".") + ["0", "0"])
            if major.isdigit() and minor.isdigit():
                return int(major), int(minor)
    return (0, 0)


def _free_port_with_free_bus() -> int:
    """A free port whose default cluster bus port (port + 10000) is free too (Redis < 7)."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((HOST, port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port with a free cluster bus port")


def start_cluster(binary: str, base: Path, size: int = 3) -> RedisCluster:
    """Start ``size`` cluster-enabled nodes, split the slots, and join them."""
    modern = server_version(binary) >= (7, 0)
    nodes: list[RedisServer] = []
    try:
        for i in range(size):
            config = {
                "cluster_enabled": "yes",
                "cluster_config_file": "nodes.conf",
                "cluster_node_timeout": "2000",
                "cluster_require_full_coverage": "no",
            }
            if modern:
                # The bus port is chosen explicitly: port+10000 may be taken or past 65535.
                config["cluster_port"] = str(free_port())
                nodes.append(start_server(binary, base, f"cluster-{i}", **config))
            else:
                node = RedisServer(binary=binary, port=_free_port_with_free_bus(),
                                   directory=base / f"cluster-{i}", config=config)
                node.start()
                nodes.append(node)
        per = 16384 // size
        for i, node in enumerate(nodes):
            lo = i * per
            hi = 16383 if i == size - 1 else (i + 1) * per - 1
            with node.client() as c:
                if modern:
                    c.cluster("ADDSLOTSRANGE", lo, hi)
                else:
                    c.cluster("ADDSLOTS", *range(lo, hi + 1))
                # Distinct config epochs, so no collision-resolution round is needed.
                c.cluster("SET-CONFIG-EPOCH", i + 1)
        for node in nodes[1:]:
            bus = nodes[0].config.get("cluster_port", str(nodes[0].port + 10000))
            with node.client() as c:
                c.cluster("MEET", HOST, nodes[0].port, bus)
        cluster = RedisCluster(nodes=nodes, cli=redis_cli(binary))
        cluster.wait_ok()
        return cluster
    except BaseException:
        for node in nodes:
            node.kill()
        raise
