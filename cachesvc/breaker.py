"""A circuit breaker around the response store: stop calling a dead store, probe for recovery."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Closed -> open after ``failures`` errors in a row; open -> half-open after ``reset_after_s``.

    Half-open lets exactly one probe through at a time: its success closes the breaker, its
    failure re-opens it for another ``reset_after_s``. Not thread-safe; one per event loop.
    """

    def __init__(
        self,
        *,
        failures: int = 5,
        reset_after_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        if failures < 1:
            raise ValueError(f"failures={failures}: must be at least 1")
        if reset_after_s <= 0:
            raise ValueError(f"reset_after_s={reset_after_s}: must be positive")
        self._threshold = failures
        self._reset_after = reset_after_s
        self._clock = clock
        self._on_change = on_change
        self._state: BreakerState = "closed"
        self._consecutive = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        if self._state == "open" and self._clock() - self._opened_at >= self._reset_after:
            self._set("half_open")
        return self._state

    def allow(self) -> bool:
        """Whether a call may go to the store now. In half-open, admits a single probe."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def success(self) -> None:
        self._consecutive = 0
        self._probe_in_flight = False
        if self._state != "closed":
            self._set("closed")

    def failure(self) -> None:
        self._probe_in_flight = False
        self._consecutive += 1
        if self._state == "half_open" or self._consecutive >= self._threshold:
            self._opened_at = self._clock()
            self._set("open")

    def _set(self, state: BreakerState) -> None:
        if state != self._state:
            self._state = state
            if self._on_change is not None:
                self._on_change(state)

    def check_valid(self) -> None:
        assert self._state in ("closed", "open", "half_open")
        assert self._consecutive >= 0
        assert not (self._probe_in_flight and self._state != "half_open"), "probe outside half-open"
        if self._state == "closed":
            assert self._consecutive < self._threshold
