"""The seams of the auditor: what it asks of the parts it does not own.

Every protocol the ``audit`` package talks through lives here, so a reader finds in one page
what a journal, an oracle, a registry (as the shadow auditor and the scan read it) or a
timing prober must do. The service's adapters
(``cachesvc.auditing``) implement them; tests implement them with plain classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

from audit.answer import Answer
from audit.facts import ModelState
from audit.finding import Finding

if TYPE_CHECKING:  # pragma: no cover - a type only: the auditor never calls the registry itself
    from invalidation import ModelVersion

RequestKind = Literal["chat", "completion"]


class Journal(Protocol):
    """Where findings and the latest results live. Implementations are thread-safe."""

    def append(self, finding: Finding) -> None:
        """Store one finding durably before returning; raise ``FindingsLogError`` if not."""
        ...

    def findings(self, *, since: float | None = None) -> list[Finding]:
        """Every stored finding with ``at >= since`` (all when ``since`` is None), oldest first."""
        ...

    def save_result(self, name: str, data: Mapping[str, Any]) -> None:
        """Replace the stored result ``name`` (``scan``, ``timing``, ``shadow`` or ``drift``)."""
        ...

    def load_result(self, name: str) -> dict[str, Any] | None:
        """The stored result ``name``, or None when there is none."""
        ...

    def close(self) -> None: ...


class RedisLike(Protocol):
    """The few synchronous redis-py calls the Redis journal makes."""

    # NOTE: the parameter types are redis-py's own (a dict of fields, keyword-only options), so
    # its sync Redis and RedisCluster clients satisfy this without a cast.
    def xadd(self, name: str, fields: dict[Any, Any], *, maxlen: int | None = None,
             approximate: bool = True) -> Any: ...
    def xrange(self, name: str, min: str = "-", max: str = "+",
               count: int | None = None) -> Any: ...
    def set(self, name: str, value: Any) -> Any: ...
    def get(self, name: str) -> Any: ...


class Oracle(Protocol):
    """Recomputes answers under the current model. Called from the auditor's worker thread."""

    #: True when a deterministic request reproduces bit for bit (the reference engine).
    exact: bool

    def complete(self, request: Mapping[str, Any], kind: RequestKind, *, tenant: str) -> Answer:
        """A fresh answer to ``request``. Raises ``OracleError`` when it cannot."""
        ...

    def score(
        self, request: Mapping[str, Any], kind: RequestKind, completion: str, *, tenant: str
    ) -> Sequence[float] | None:
        """Teacher-forced log-probabilities of ``completion``'s tokens after the request's
        prompt, under the current model; None when the oracle cannot score."""
        ...


class RegistryView(Protocol):
    """The registry as the auditor reads it (synchronously, from its worker thread)."""

    def current(self, model: str) -> ModelState | None: ...


class RegistryReader(Protocol):
    """The registry as the offline scan reads it: every model it knows, and the epoch of a
    model it has no rollout of (``invalidation.ModelRegistry``, or the service's view of it)."""

    async def list(self) -> Sequence[ModelVersion]: ...

    async def genesis(self) -> int: ...


class FreshVersions(Protocol):
    """The service's model versions (``cachesvc.models.ModelVersions``): ``fresh`` reads the
    registry itself, not the replica's cached view of it."""

    async def current(self, model: str, *, fresh: bool = False) -> tuple[str, int]: ...


class Prober(Protocol):
    """Sends ``prompt`` with ``key`` (and the request's ``user`` field, when given) asking for
    one output token; returns the seconds it took."""

    def __call__(self, *, key: str, prompt: str, user: str | None = None) -> float: ...
