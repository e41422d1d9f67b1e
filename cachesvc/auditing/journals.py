"""Where the service's audit findings and results go: beside its store."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from audit import FileJournal, FindingsLogError, Journal, Recorder, RedisJournal
from cachesvc.settings import RedisSettings, Settings

#: Timeouts of the journal's Redis client: it writes from the auditor's thread and the CLI,
#: never on the request path, so it may wait longer than the store.
JOURNAL_TIMEOUT_S = 2.0


def default_findings_path(state_dir: str) -> Path:
    return Path(state_dir).expanduser() / "audit" / "findings.jsonl"


def findings_path_of(settings: Settings) -> str | Path:
    """The findings file of ``settings``: ``[audit] findings_path``, else the one in
    ``state_dir`` (the journal itself when ``[redis]`` names no store)."""
    return settings.audit.findings_path or default_findings_path(settings.state_dir)


def open_journal(*, redis_url: str | None, findings_path: str | Path,
                 redis_nodes: Sequence[str] = (), redis_prefix: str = "llmc:audit") -> Journal:
    """A Redis-stream journal in the deployment the store uses (standalone or Cluster, with
    its credentials), a file journal beside the embedded store."""
    from cachesvc.store.targets import redis_target

    target = redis_target(redis_url, redis_nodes)
    if target is None:
        return FileJournal(findings_path)
    from redis.exceptions import RedisClusterException, RedisError

    from cachesvc.store.redis_client import redis_client

    try:
        # NOTE: a cluster client connects here, to read the slot map.
        client = redis_client(target, flavour="sync", socket_timeout=JOURNAL_TIMEOUT_S,
                              connect_timeout=JOURNAL_TIMEOUT_S)
    except (RedisError, RedisClusterException, OSError) as exc:
        raise FindingsLogError(f"cannot open the audit journal in Redis ({exc}); check "
                               "[redis] url (or nodes) and its credentials") from exc
    return RedisJournal(client, prefix=redis_prefix)


def journal_for(redis: RedisSettings, findings_path: str | Path) -> Journal:
    """The journal beside the store ``[redis]`` names."""
    return open_journal(redis_url=redis.url, redis_nodes=redis.nodes,
                        findings_path=findings_path)


def make_recorder(journal: Journal, *, fallback_path: str | Path | None = None) -> Recorder:
    fallback = FileJournal(fallback_path) if fallback_path is not None else None
    return Recorder(journal, fallback=fallback)
