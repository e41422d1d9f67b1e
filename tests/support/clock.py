"""A clock a test moves by hand, for code that takes ``clock=`` (TTL, breakers, refresh bounds)."""

from __future__ import annotations


class FakeClock:
    """Returns :attr:`now` when called; a test sets or advances it."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
