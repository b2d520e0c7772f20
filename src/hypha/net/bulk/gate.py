"""The direct listener's gate: caps on connections still in their handshake.

Owns counting the accepted connections that have not yet finished their TLS handshake and
sent their first frame, in all and per remote host, refusing a new one at once past either
cap, and counting (and logging, at most once per ``LOG_INTERVAL_SECONDS``) the refusals
and the handshakes that ran out of time. Anyone can open a TCP connection, certificate or
not: without the caps, idle sockets would pile up for as long as the handshake deadline
allows. It neither handshakes nor enforces the deadline (``direct.py`` does both).
"""

from __future__ import annotations

import logging
from typing import Final

from hypha.net.bulk.stats import Counters
from hypha.net.limits import KeyedCounter, LogThrottle

logger = logging.getLogger(__name__)

LOG_INTERVAL_SECONDS: Final = 10.0
"""At most one log line per interval about refused or timed-out handshakes."""


class HandshakeGate:
    """Admits a direct connection into its handshake while both caps allow it.

    Args:
        counters: where refusals and timeouts are counted.
        max_handshakes: connections still handshaking at once, from all hosts.
        max_per_host: connections still handshaking at once from one remote host.

    Raises:
        ValueError: a cap below 1.
    """

    def __init__(self, counters: Counters, *, max_handshakes: int, max_per_host: int) -> None:
        if max_handshakes < 1 or max_per_host < 1:
            raise ValueError("max_handshakes and max_handshakes_per_host must be at least 1")
        self._counters = counters
        self._max = max_handshakes
        self._max_per_host = max_per_host
        self._by_host = KeyedCounter()
        """Connections handshaking by remote host."""
        self._num_handshaking = 0
        self._log_throttle = LogThrottle(LOG_INTERVAL_SECONDS)

    def __len__(self) -> int:
        """Connections handshaking now."""
        return self._num_handshaking

    def enter(self, host: str) -> bool:
        """Admit a connection from ``host`` into its handshake; False: close it at once.

        Every admitted connection must ``leave`` once its handshake ended, however it ended.
        """
        from_host = self._by_host.get(host)
        if self._num_handshaking >= self._max or from_host >= self._max_per_host:
            self._counters.num_handshakes_refused += 1
            self._log(
                "closed a direct connection from %s at once: %d connections are still "
                "handshaking, %d of them from that host (%d such since start)",
                *(host, self._num_handshaking, from_host, self._counters.num_handshakes_refused),
            )
            return False
        self._by_host.add(host, 1)
        self._num_handshaking += 1
        return True

    def leave(self, host: str) -> None:
        """The handshake of a connection ``enter`` admitted from ``host`` has ended."""
        self._by_host.remove(host, 1)
        self._num_handshaking -= 1

    def timed_out(self, remote: str, seconds: float) -> None:
        """Count a connection from ``remote`` whose handshake passed its deadline."""
        self._counters.num_handshake_timeouts += 1
        self._log(
            "closed the direct connection from %s: no handshake and request within %g s "
            "(%d such since start)",
            *(remote, seconds, self._counters.num_handshake_timeouts),
        )

    def _log(self, message: str, *args: object) -> None:
        if self._log_throttle.ready():
            logger.warning(message, *args)
