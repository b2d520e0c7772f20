"""Counters of the bulk channel and their frozen snapshot.

Owns ``BulkStatistics`` (what ``BulkService.statistics()`` returns) and ``Counters``, the
one mutable tally that the sender's registry, the listener's handshake gate and the
receiver's pull share. It does not decide what counts as a refusal or a retry:
``offers.py``, ``gate.py`` and ``pull.py`` do, and call it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hypha.net.bulk.exchange import Channel


@dataclass(frozen=True, slots=True)
class BulkStatistics:
    """Counters of a ``BulkService`` since start; transfers count on both sides."""

    bytes_sent: int
    bytes_received: int
    num_direct: int
    """Transfers completed over the direct TLS channel (sent or received)."""
    num_relayed: int
    """Transfers completed over a libp2p stream, the relay fallback (sent or received)."""
    num_failed: int
    """Pulls that gave up: refused, or every attempt failed."""
    num_retries: int
    num_refused: int
    """Requests this sender refused: TLS handshake, unknown token, wrong peer, changed file."""
    num_reused: int
    """Pulls that overwrote a spare file instead of creating a new one."""
    num_handshakes_refused: int
    """Direct connections closed at once: too many were still handshaking (in all, or from
    their remote host)."""
    num_handshake_timeouts: int
    """Direct connections closed because their TLS handshake and first frame did not arrive
    within the handshake deadline."""
    num_pending: int
    num_handshaking: int
    """Direct connections accepted whose handshake and first frame are still awaited."""


@dataclass
class Counters:
    """The running tally behind ``BulkStatistics`` (all but the two current levels)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    num_direct: int = 0
    num_relayed: int = 0
    num_failed: int = 0
    num_retries: int = 0
    num_refused: int = 0
    num_reused: int = 0
    num_handshakes_refused: int = 0
    num_handshake_timeouts: int = 0

    def transferred(self, size: int, channel: Channel, *, received: bool) -> None:
        """Count one completed transfer of ``size`` bytes over ``channel``."""
        if received:
            self.bytes_received += size
        else:
            self.bytes_sent += size
        if channel == "direct":
            self.num_direct += 1
        else:
            self.num_relayed += 1

    def snapshot(self, *, num_pending: int, num_handshaking: int) -> BulkStatistics:
        """Return a frozen copy of the counters, with the pending offers and open handshakes."""
        return BulkStatistics(
            **dataclasses.asdict(self), num_pending=num_pending, num_handshaking=num_handshaking
        )
