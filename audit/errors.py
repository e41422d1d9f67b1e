"""Errors raised by the auditor.

A caller's mistake (a bad sample rate, an unreadable findings file, a timing target that does
not answer) names the value and the fix. A broken invariant of ours is a ``RuntimeError``.
"""

from __future__ import annotations


class AuditError(Exception):
    """Base of every error raised by ``audit``."""


class AuditConfigError(AuditError, ValueError):
    """Raised when an auditor setting is out of range or inconsistent.

    ``field`` names the setting (as it is spelled in the config file); the message says what
    would be accepted.
    """

    def __init__(self, field: str, problem: str, fix: str) -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field}: {problem}; {fix}")


class FindingsLogError(AuditError, OSError):
    """Raised when the durable findings log cannot be written or read back.

    The auditor fails closed here: a finding that cannot be recorded is an error, not a silence.
    """


class TimingProbeError(AuditError, ConnectionError):
    """Raised when the timing audit's target does not answer a probe successfully.

    The message names the level, the status or exception, and what to check (URL, key, model).
    """


class OracleError(AuditError, RuntimeError):
    """Raised when an oracle (the engine or an upstream) fails to recompute an answer.

    The shadow auditor counts these as ``undecided`` checks; it never turns them into findings.
    """
