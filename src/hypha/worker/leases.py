"""The worker's leases: who holds this worker's resources, and what happens on expiry.

Owns the RPC handlers of the lease holder's requests (``RenewLease``, ``ReleaseLease``),
the holder check that refuses anyone else (a forged request gets ``LeaseError``), the
expiry watcher that frees resources promptly and tells the job manager to stop the tasks
that ran under an expired or released lease, and ending every lease of a holder whose
certificate is revoked (``Node.on_peer_revoked``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from hypha.errors import LeaseError
from hypha.leases import Lease, LeaseKind, ResourceLedger
from hypha.net.host import Node
from hypha.protocol import messages as m
from hypha.resources import Resources

logger = logging.getLogger(__name__)

OnLeaseEnd = Callable[[str, str], Awaitable[None]]
"""``async def on_end(lease_id, reason)``: stop what runs under the lease."""


@dataclass(frozen=True, slots=True)
class WorkerLeaseStatistics:
    """A snapshot of a ``WorkerLeases``' counters (for telemetry; the ledger has its own)."""

    num_renewed: int
    num_released: int
    num_expired: int
    """Accepted (renewable) leases that lapsed without their holder releasing them."""
    num_revoked: int
    """Leases (accepted or offered) ended because their holder's certificate was revoked."""


class WorkerLeases:
    """The ledger of this worker plus the protocol around it."""

    def __init__(self, node: Node, capacity: Resources) -> None:
        self._node = node
        self.ledger = ResourceLedger(capacity, trio.current_time)
        self._durations: dict[str, float] = {}
        self._changed = trio.Event()
        self._on_end: list[OnLeaseEnd] = []
        self._num_renewed = self._num_released = self._num_expired = self._num_revoked = 0
        node.rpc.register(m.RenewLeaseRequest, self._renew, roles={"scheduler"})
        node.rpc.register(m.ReleaseLeaseRequest, self._release, roles={"scheduler"})
        node.on_peer_revoked(self._holder_revoked)

    def statistics(self) -> WorkerLeaseStatistics:
        """Return a snapshot of the counters."""
        return WorkerLeaseStatistics(
            num_renewed=self._num_renewed,
            num_released=self._num_released,
            num_expired=self._num_expired,
            num_revoked=self._num_revoked,
        )

    @property
    def num_expired(self) -> int:
        """``statistics().num_expired`` (kept for readers of the old attribute)."""
        return self._num_expired

    def on_lease_end(self, callback: OnLeaseEnd) -> None:
        self._on_end.append(callback)

    def changed(self) -> None:
        """Wake the expiry watcher (a lease was added, promoted or removed)."""
        self._changed.set()
        self._changed = trio.Event()

    def held_by(self, lease_id: str, peer: str) -> Lease[Resources]:
        """The live renewable lease ``lease_id`` if ``peer`` holds it, else ``LeaseError``."""
        lease = self.ledger.get(lease_id)
        if lease is None:
            raise LeaseError(f"lease {lease_id} is unknown or expired")
        if lease.holder != peer:
            logger.warning("refused %s: lease %s is held by another peer", peer, lease_id)
            raise LeaseError(f"lease {lease_id} is not held by {peer}")
        if lease.kind is not LeaseKind.RENEWABLE:
            raise LeaseError(f"lease {lease_id} has not been accepted")
        return lease

    def remember_duration(self, lease_id: str, seconds: float) -> None:
        self._durations[lease_id] = seconds

    async def _renew(self, peer: str, request: m.RenewLeaseRequest) -> m.Msg:
        lease = self.ledger.get(request.lease_id)
        if lease is None:
            return m.LeaseGone(lease_id=request.lease_id, reason="unknown or expired")
        self.held_by(request.lease_id, peer)
        seconds = self._durations.get(request.lease_id, lease.expires_at - trio.current_time())
        self.ledger.renew(request.lease_id, peer, seconds)
        self._num_renewed += 1
        self.changed()
        return m.LeaseRenewed(lease_id=request.lease_id, lease_seconds=seconds)

    async def _release(self, peer: str, request: m.ReleaseLeaseRequest) -> m.Ack:
        if self.ledger.get(request.lease_id) is not None:
            self.held_by(request.lease_id, peer)
            self.ledger.remove(request.lease_id, peer)
            self._durations.pop(request.lease_id, None)
            self._num_released += 1
            self.changed()
            await self._ended(request.lease_id, "released by its holder")
        return m.Ack()

    async def _holder_revoked(self, peer: str) -> None:
        """End every lease ``peer`` holds: its resources free up, its tasks are stopped.

        Offered (temporary) leases are dropped without stopping anything, as an unanswered
        offer is; accepted ones end as a release does.
        """
        leases = self.ledger.by_holder(peer)
        for lease in leases:
            self.ledger.remove(lease.lease_id, peer)
            self._durations.pop(lease.lease_id, None)
            self._num_revoked += 1
        if leases:
            logger.warning("ending %d lease(s) of %s: its certificate is revoked", len(leases), peer)
            self.changed()
        for lease in leases:
            if lease.kind is LeaseKind.RENEWABLE:
                await self._ended(lease.lease_id, "the holder's certificate was revoked")

    async def _ended(self, lease_id: str, reason: str) -> None:
        for callback in self._on_end:
            await callback(lease_id, reason)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch for expiry until cancelled: resources free up at once, tasks are stopped."""
        task_status.started()
        while True:
            changed = self._changed
            deadline = self.ledger.next_expiry()
            with trio.move_on_at(deadline if deadline is not None else math.inf):
                await changed.wait()
            for lease in self.ledger.pop_expired():
                self._durations.pop(lease.lease_id, None)
                if lease.kind is LeaseKind.RENEWABLE:
                    self._num_expired += 1
                    logger.warning("lease %s of %s expired", lease.lease_id, lease.holder)
                    await self._ended(lease.lease_id, "lease expired")
