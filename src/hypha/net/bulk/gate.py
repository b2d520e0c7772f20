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
import math
from typing import Final

import trio

from hypha.net.bulk.stats import Counters

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
        self._by_host: dict[str, int] = {}
        """Connections handshaking by remote host; a host with none has no entry."""
        self._num_handshaking = 0
        self._next_log = -math.inf

    def __len__(self) -> int:
        """Connections handshaking now."""
        return self._num_handshaking

    def enter(self, host: str) -> bool:
        """Admit a connection from ``host`` into its handshake; False: close it at once.

        Every admitted connection must ``leave`` once its handshake ended, however it ended.
        """
        from_host = self._by_host.get(host, 0)
        if self._num_handshaking >= self._max or from_host >= self._max_per_host:
            self._counters.num_handshakes_refused += 1
            self._log(
                "closed a direct connection from %s at once: %d connections are still "
                "handshaking, %d of them from that host (%d such since start)",
                *(host, self._num_handshaking, from_host, self._counters.num_handshakes_refused),
            )
            return False
        self._by_host[host] = from_host + 1
        self._num_handshaking += 1
        return True

    def leave(self, host: str) -> None:
        """The handshake of a connection ``enter`` admitted from ``host`` has ended."""
        left = self._by_host[host] - 1
        if left:
            self._by_host[host] = left
        else:
            del self._by_host[host]
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
        now = trio.current_time()
        if now >= self._next_log:
            self._next_log = now + LOG_INTERVAL_SECONDS
            logger.warning(message, *args)
