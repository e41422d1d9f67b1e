"""A token bucket of seconds: how much of one core an expensive check may use."""

from __future__ import annotations


class TokenBucket:
    """Credit in seconds of work: it fills at ``rate`` seconds per second and holds at most
    ``burst``, so idle time never banks more than one burst. Work is allowed while there is
    credit and paid for afterwards with the time it took (it may overdraw once)."""

    def __init__(self, *, burst: float, now: float) -> None:
        self.credit = burst
        self.since = now

    def refill(self, *, rate: float, burst: float, now: float) -> bool:
        """Add what ``rate`` earned since the last refill (capped at ``burst``); True while
        there is credit to spend."""
        self.credit = min(burst, self.credit + rate * (now - self.since))
        self.since = now
        return self.credit > 0

    def spend(self, seconds: float) -> None:
        self.credit -= seconds

    def skip_to(self, now: float) -> None:
        """Earn nothing for the time until ``now`` (a benchmark's runs without sampling)."""
        self.since = now

    def drain(self, *, now: float) -> None:
        """No credit left at ``now`` (a benchmark starts in the steady state)."""
        self.credit = 0.0
        self.since = now
