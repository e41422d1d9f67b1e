"""The durable record of the auditor: findings (append-only) and the latest scan/timing results.

Two implementations of one small :class:`~audit.protocols.Journal` protocol:

* :class:`FileJournal` (the embedded store's companion): findings are JSON lines appended to one
  file, each line flushed and ``fsync``-ed before ``append`` returns, so a finding that was
  recorded survives the process and the machine stopping; the latest results are JSON files
  beside it, replaced atomically (write, fsync, rename).
* :class:`RedisJournal` (the Redis store's companion): findings are entries of a Redis stream
  (``XADD``), results are plain keys. Every key carries the same hash tag, so a Redis Cluster
  keeps them in one slot and nothing needs a cross-slot operation. It takes a *synchronous*
  redis-py client (``redis.Redis`` or ``redis.RedisCluster``) built by the caller.

Readers skip a torn last line (a crash mid-write) rather than fail the report, and count it.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import structlog

from audit.errors import FindingsLogError
from audit.finding import Finding
from audit.protocols import RedisLike

log = structlog.get_logger("audit.journal")

#: Names of the stored results a report reads (the last scan, the last timing audit).
RESULT_NAMES = ("scan", "timing", "shadow", "drift")


def _check_result_name(name: str) -> None:
    if name not in RESULT_NAMES:
        raise ValueError(f"result name {name!r}: use one of {RESULT_NAMES}")


def _dumps(data: Mapping[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


class FileJournal:
    """Findings as fsync-ed JSON lines in ``path``; results as ``<stem>.<name>.json`` beside it."""

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.path = Path(path)
        self._fsync = fsync
        self._lock = threading.Lock()
        self.torn_lines = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FindingsLogError(
                f"findings_path {str(self.path)!r}: cannot create its directory ({exc}); "
                "point [audit] findings_path at a writable location"
            ) from exc

    def result_path(self, name: str) -> Path:
        _check_result_name(name)
        return self.path.with_name(f"{self.path.stem}.{name}.json")

    def append(self, finding: Finding) -> None:
        line = (_dumps(finding.as_dict()) + "\n").encode("utf-8")
        with self._lock:
            try:
                # O_APPEND: concurrent writers (several workers) never interleave inside a line
                # shorter than PIPE_BUF, and a line is always written in one write() call.
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    os.write(fd, line)
                    if self._fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise FindingsLogError(
                    f"findings_path {str(self.path)!r}: cannot append a finding ({exc}); "
                    "check the disk and the file's permissions"
                ) from exc

    def _lines(self) -> Iterator[str]:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as fh:
                yield from fh
        except FileNotFoundError:
            return
        except OSError as exc:
            raise FindingsLogError(
                f"findings_path {str(self.path)!r}: cannot read ({exc}); check the path"
            ) from exc

    def findings(self, *, since: float | None = None) -> list[Finding]:
        out: list[Finding] = []
        torn = 0
        for line in self._lines():
            line = line.strip()
            if not line:
                continue
            try:
                finding = Finding.from_dict(json.loads(line))
            except (ValueError, KeyError, TypeError):
                torn += 1
                continue
            if since is None or finding.at >= since:
                out.append(finding)
        self.torn_lines = torn
        if torn:
            log.warning("audit.journal.torn_lines", path=str(self.path), count=torn)
        out.sort(key=lambda f: f.at)
        return out

    def save_result(self, name: str, data: Mapping[str, Any]) -> None:
        target = self.result_path(name)
        tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(_dumps(data))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            raise FindingsLogError(
                f"cannot write the {name} result to {str(target)!r} ({exc}); check the directory"
            ) from exc

    def load_result(self, name: str) -> dict[str, Any] | None:
        target = self.result_path(name)
        try:
            result: dict[str, Any] = json.loads(target.read_text(encoding="utf-8"))
            return result
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise FindingsLogError(
                f"the {name} result at {str(target)!r} is unreadable ({exc}); "
                f"rerun `cachesvc audit {name}` to replace it"
            ) from exc

    def close(self) -> None:
        return None


class RedisJournal:
    """Findings in a Redis stream, results in keys, all under one hash tag."""

    def __init__(
        self,
        client: RedisLike,
        *,
        prefix: str = "llmc:audit",
        maxlen: int | None = 1_000_000,
        page: int = 1000,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix {prefix!r}: must not contain braces (the journal adds its "
                             "own hash tag)")
        self._r = client
        self._maxlen = maxlen
        self._page = page
        tag = "{" + prefix + "}"
        self.stream_key = f"{tag}:findings"
        self._result_prefix = f"{tag}:result:"

    def append(self, finding: Finding) -> None:
        try:
            self._r.xadd(self.stream_key, {"f": _dumps(finding.as_dict())},
                         maxlen=self._maxlen, approximate=True)
        except Exception as exc:  # redis errors, timeouts, connection refused
            raise FindingsLogError(
                f"cannot append a finding to the Redis stream {self.stream_key!r} ({exc!r}); "
                "check [redis] url and that the server is up"
            ) from exc

    def findings(self, *, since: float | None = None) -> list[Finding]:
        out: list[Finding] = []
        # Stream ids are the server's append time; allow an hour for clocks and queueing.
        start = "-" if since is None else f"{max(0, int((since - 3600) * 1000))}-0"
        try:
            while True:
                rows = self._r.xrange(self.stream_key, min=start, max="+", count=self._page)
                if not rows:
                    break
                for _stream_id, fields in rows:
                    raw = fields.get(b"f", fields.get("f"))
                    if raw is None:
                        continue
                    try:
                        finding = Finding.from_dict(json.loads(raw))
                    except (ValueError, KeyError, TypeError):
                        continue
                    if since is None or finding.at >= since:
                        out.append(finding)
                last = rows[-1][0]
                last = last.decode() if isinstance(last, bytes) else str(last)
                start = "(" + last
                if len(rows) < self._page:
                    break
        except Exception as exc:
            raise FindingsLogError(
                f"cannot read the Redis stream {self.stream_key!r} ({exc!r}); check [redis] url"
            ) from exc
        out.sort(key=lambda f: f.at)
        return out

    def save_result(self, name: str, data: Mapping[str, Any]) -> None:
        _check_result_name(name)
        try:
            self._r.set(self._result_prefix + name, _dumps(data))
        except Exception as exc:
            raise FindingsLogError(f"cannot store the {name} result in Redis ({exc!r})") from exc

    def load_result(self, name: str) -> dict[str, Any] | None:
        _check_result_name(name)
        try:
            raw = self._r.get(self._result_prefix + name)
        except Exception as exc:
            raise FindingsLogError(f"cannot read the {name} result from Redis ({exc!r})") from exc
        return None if raw is None else json.loads(raw)

    def close(self) -> None:
        close = getattr(self._r, "close", None)
        if callable(close):
            close()
