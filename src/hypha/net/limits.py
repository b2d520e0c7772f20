"""Small tallies the network layer's caps share: a rate-limited log line, per-key counts.

Owns ``LogThrottle`` (lets one log line through per interval of trio's clock, so a flood of
refusals does not flood the logs) and ``KeyedCounter`` (amounts in flight by key, with no
entry for a key at zero, so peers or hosts that come and go leave nothing behind). It
decides no cap itself: ``rpc.py`` (request bytes per peer) and ``bulk/gate.py`` (handshakes
per host) do.
"""

from __future__ import annotations

import math

import trio


class LogThrottle:
    """Says whether a log line may go out: at most once per ``interval_seconds``.

    Reads ``trio.current_time()``, so it must be used inside ``trio.run``.
    """

    def __init__(self, interval_seconds: float) -> None:
        self._interval = interval_seconds
        self._next = -math.inf

    def ready(self) -> bool:
        """Whether a line may be logged now; True starts the next interval."""
        now = trio.current_time()
        if now < self._next:
            return False
        self._next = now + self._interval
        return True


class KeyedCounter:
    """Amounts in flight by key; a key whose amount drops to zero has no entry."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def get(self, key: str) -> int:
        """The amount ``key`` has in flight (0 for a key with none)."""
        return self._counts.get(key, 0)

    def add(self, key: str, amount: int) -> None:
        self._counts[key] = self._counts.get(key, 0) + amount

    def remove(self, key: str, amount: int) -> None:
        """Take back ``amount`` that ``add`` gave ``key``; the entry goes at zero."""
        left = self._counts[key] - amount
        if left:
            self._counts[key] = left
        else:
            del self._counts[key]

    def total(self) -> int:
        """The amounts of all keys together."""
        return sum(self._counts.values())
