"""Single-flight: concurrent identical misses in one process make one upstream call.

The first caller for a key becomes the leader and fills; followers wait for its outcome. Across
workers or replicas there is no coordination: each process may make one call per key (at most
one per process, never a stampede per request). A follower whose leader failed, or who waited
longer than the bound, calls the upstream itself rather than failing the request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Any


class Flight:
    """One in-progress fill. The leader resolves it; followers await it."""

    __slots__ = ("future", "followers")

    def __init__(self) -> None:
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.followers = 0


class SingleFlight:
    def __init__(self) -> None:
        self._flights: dict[Hashable, Flight] = {}

    def join(self, key: Hashable) -> tuple[Flight, bool]:
        """Return the flight for ``key`` and whether the caller leads it."""
        flight = self._flights.get(key)
        if flight is not None:
            flight.followers += 1
            return flight, False
        flight = Flight()
        self._flights[key] = flight
        return flight, True

    def finish(self, key: Hashable, flight: Flight, result: Any = None,
               error: BaseException | None = None) -> None:
        """Leader only: publish the outcome (``None`` means 'nothing to share') and leave."""
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.future.done():
            if error is not None:
                flight.future.set_exception(error)
                flight.future.exception()  # mark retrieved: followers may be none
            else:
                flight.future.set_result(result)

    @staticmethod
    async def wait(flight: Flight, timeout: float) -> Any:  # noqa: ASYNC109 - a per-call bound
        """Follower: the leader's result, or ``None`` if it failed or took too long."""
        try:
            return await asyncio.wait_for(asyncio.shield(flight.future), timeout)
        except TimeoutError:
            return None
        except Exception:  # noqa: BLE001 - the leader's failure: the follower fills for itself
            return None

    def __len__(self) -> int:
        return len(self._flights)

    def check_valid(self) -> None:
        for flight in self._flights.values():
            assert not flight.future.done(), "a finished flight is still registered"
            assert flight.followers >= 0
