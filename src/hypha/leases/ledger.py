"""Lease ledger: who holds what, until when.

This module owns the bookkeeping of leases: a lease gives one holder (a peer id) an item
until ``expires_at`` on an injected clock. Leases start TEMPORARY (an offer's short
reservation) and become RENEWABLE when accepted; only renewable leases can be renewed.
``ResourceLedger`` specialises the ledger to ``Resources`` and refuses reservations that
exceed free capacity. Both sides use it: a worker for its reservations, a scheduler for the
workers it holds.

It does not run timers, talk to the network or read a real clock: the owner calls
``pop_expired`` (for example at ``next_expiry``) and acts on what expired.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from hypha.errors import LeaseError
from hypha.resources import Resources

T = TypeVar("T")

Clock = Callable[[], float]
"""Returns the current time in seconds; ``trio.current_time`` in nodes, a fake in tests."""


class LeaseKind(enum.Enum):
    """TEMPORARY leases hold an offer open; RENEWABLE ones back accepted work."""

    TEMPORARY = "temporary"
    RENEWABLE = "renewable"


@dataclass(frozen=True, slots=True)
class Lease(Generic[T]):
    """One lease: a snapshot; renewing or promoting returns a new value."""

    lease_id: str
    holder: str
    item: T
    kind: LeaseKind
    expires_at: float


@dataclass(frozen=True, slots=True)
class LedgerStatistics:
    """Counts of live (unexpired) leases by kind."""

    num_temporary: int
    num_renewable: int


@dataclass(frozen=True, slots=True)
class ResourceLedgerStatistics(LedgerStatistics):
    """Lease counts plus total capacity and what is free of live leases."""

    capacity: Resources
    free: Resources


def _check_duration(duration_seconds: float) -> None:
    if not math.isfinite(duration_seconds) or duration_seconds <= 0:
        raise ValueError(f"duration_seconds must be finite and > 0, got {duration_seconds!r}")


class Ledger(Generic[T]):
    """Leases keyed by id, each with a holder, an item, a kind and an expiry.

    A lease is *live* while ``now < expires_at``. Expired leases are invisible to ``get``,
    ``by_holder``, iteration and ``len``, and every operation on them fails; they stay in the
    ledger only until ``pop_expired`` hands them to the owner, so each inserted lease leaves
    exactly once: through ``remove`` while live, or through ``pop_expired``.

    Args:
        clock: Returns the current time in seconds.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._leases: dict[str, Lease[T]] = {}

    # --- queries ---------------------------------------------------------------------

    def _live(self, now: float) -> Iterator[Lease[T]]:
        return (lease for lease in self._leases.values() if lease.expires_at > now)

    def get(self, lease_id: str) -> Lease[T] | None:
        """Return the live lease with this id, or None (unknown or expired)."""
        lease = self._leases.get(lease_id)
        if lease is None or lease.expires_at <= self._clock():
            return None
        return lease

    def by_holder(self, holder: str) -> list[Lease[T]]:
        """Return the live leases held by ``holder``, in insertion order."""
        return [lease for lease in self._live(self._clock()) if lease.holder == holder]

    def next_expiry(self) -> float | None:
        """Return the earliest ``expires_at`` still in the ledger (expired or not), or None.

        An owner that sleeps until this time and then calls ``pop_expired`` never misses an
        expiry; a value in the past means ``pop_expired`` has work now.
        """
        return min((lease.expires_at for lease in self._leases.values()), default=None)

    def __len__(self) -> int:
        return sum(1 for _ in self._live(self._clock()))

    def __iter__(self) -> Iterator[Lease[T]]:
        return iter(list(self._live(self._clock())))

    def statistics(self) -> LedgerStatistics:
        """Return a snapshot of live lease counts by kind."""
        num_temporary, num_renewable = self._count_kinds()
        return LedgerStatistics(num_temporary=num_temporary, num_renewable=num_renewable)

    def _count_kinds(self) -> tuple[int, int]:
        live = list(self._live(self._clock()))
        num_temporary = sum(1 for lease in live if lease.kind is LeaseKind.TEMPORARY)
        return num_temporary, len(live) - num_temporary

    # --- changes ---------------------------------------------------------------------

    def insert(
        self,
        lease_id: str,
        holder: str,
        item: T,
        duration_seconds: float,
        kind: LeaseKind = LeaseKind.TEMPORARY,
    ) -> Lease[T]:
        """Add a lease that expires ``duration_seconds`` from now.

        Args:
            lease_id: Unique id; ids of expired leases stay taken until ``pop_expired``.
            holder: Peer id of the party the lease is for.
            item: What the lease holds.
            duration_seconds: Lifetime, finite and positive.
            kind: TEMPORARY (default) or RENEWABLE.

        Returns:
            The new lease.

        Raises:
            LeaseError: ``lease_id`` is already in the ledger (or, in ``ResourceLedger``,
                the item does not fit in free capacity).
            ValueError: Empty id or holder, or a bad duration.
        """
        if not lease_id or not holder:
            raise ValueError("lease_id and holder must be non-empty")
        _check_duration(duration_seconds)
        if lease_id in self._leases:
            raise LeaseError(f"lease {lease_id} already exists")
        self._admit(lease_id, item)
        lease = Lease(
            lease_id=lease_id,
            holder=holder,
            item=item,
            kind=kind,
            expires_at=self._clock() + duration_seconds,
        )
        self._leases[lease_id] = lease
        return lease

    def _admit(self, lease_id: str, item: T) -> None:
        """Hook for subclasses: raise ``LeaseError`` to refuse a new lease's item."""

    def _held(self, lease_id: str, holder: str) -> Lease[T]:
        lease = self.get(lease_id)
        if lease is None:
            raise LeaseError(f"lease {lease_id} is unknown or expired")
        if lease.holder != holder:
            raise LeaseError(f"lease {lease_id} is not held by {holder}")
        return lease

    def renew(self, lease_id: str, holder: str, duration_seconds: float) -> Lease[T]:
        """Set a renewable lease to expire ``duration_seconds`` from now.

        Args:
            lease_id: The lease.
            holder: Who asks; must be the holder.
            duration_seconds: New lifetime from now (not an extension of the old expiry).

        Returns:
            The renewed lease.

        Raises:
            LeaseError: The lease is unknown, expired, held by someone else, or still
                TEMPORARY (an offer must be accepted with ``promote`` before it is renewed).
            ValueError: A bad duration.
        """
        _check_duration(duration_seconds)
        lease = self._held(lease_id, holder)
        if lease.kind is not LeaseKind.RENEWABLE:
            raise LeaseError(f"lease {lease_id} is temporary; promote it before renewing")
        renewed = replace(lease, expires_at=self._clock() + duration_seconds)
        self._leases[lease_id] = renewed
        return renewed

    def promote(self, lease_id: str, holder: str, duration_seconds: float) -> Lease[T]:
        """Turn a TEMPORARY lease into a RENEWABLE one expiring ``duration_seconds`` from now.

        Args:
            lease_id: The lease.
            holder: Who asks; must be the holder.
            duration_seconds: Lifetime of the renewable lease from now.

        Returns:
            The promoted lease.

        Raises:
            LeaseError: The lease is unknown, expired, held by someone else, or already
                RENEWABLE (a duplicate acceptance).
            ValueError: A bad duration.
        """
        _check_duration(duration_seconds)
        lease = self._held(lease_id, holder)
        if lease.kind is not LeaseKind.TEMPORARY:
            raise LeaseError(f"lease {lease_id} is already renewable")
        promoted = replace(lease, kind=LeaseKind.RENEWABLE, expires_at=self._clock() + duration_seconds)
        self._leases[lease_id] = promoted
        return promoted

    def remove(self, lease_id: str, holder: str | None = None) -> Lease[T] | None:
        """Remove a live lease (release or reject) and return it.

        Args:
            lease_id: The lease.
            holder: If given, the lease must be held by this peer.

        Returns:
            The removed lease, or None if it is unknown or already expired (an expired
            lease stays for ``pop_expired``).

        Raises:
            LeaseError: ``holder`` is given and the live lease is held by someone else.
        """
        lease = self.get(lease_id)
        if lease is None:
            return None
        if holder is not None and lease.holder != holder:
            raise LeaseError(f"lease {lease_id} is not held by {holder}")
        del self._leases[lease_id]
        return lease

    def pop_expired(self) -> list[Lease[T]]:
        """Remove and return every lease with ``expires_at <= now``, earliest first."""
        now = self._clock()
        expired = sorted(
            (lease for lease in self._leases.values() if lease.expires_at <= now),
            key=lambda lease: (lease.expires_at, lease.lease_id),
        )
        for lease in expired:
            del self._leases[lease.lease_id]
        return expired


class ResourceLedger(Ledger[Resources]):
    """A ledger of resource reservations that never exceed a fixed capacity.

    Only live leases count against capacity: a lease frees its resources the moment it
    expires, before ``pop_expired`` is called.

    Args:
        capacity: Everything this node can lease out.
        clock: Returns the current time in seconds.
    """

    def __init__(self, capacity: Resources, clock: Clock) -> None:
        super().__init__(clock)
        self._capacity = capacity

    @property
    def capacity(self) -> Resources:
        """The total that can be leased out."""
        return self._capacity

    def free(self) -> Resources:
        """Capacity minus the items of all live leases."""
        reserved = Resources()
        for lease in self._live(self._clock()):
            reserved = reserved + lease.item
        return self._capacity - reserved

    def _admit(self, lease_id: str, item: Resources) -> None:
        free = self.free()
        if not item.fits_in(free):
            raise LeaseError(f"cannot reserve {item} for lease {lease_id}: only {free} is free")

    def reserve(
        self,
        lease_id: str,
        holder: str,
        amount: Resources,
        duration_seconds: float,
        kind: LeaseKind = LeaseKind.TEMPORARY,
    ) -> Lease[Resources]:
        """Reserve ``amount`` for ``holder`` under a new lease (TEMPORARY by default).

        Args:
            lease_id: Unique id of the new lease.
            holder: Peer id the reservation is for.
            amount: Resources to set aside.
            duration_seconds: Lifetime, finite and positive.
            kind: TEMPORARY for an offer, RENEWABLE for direct grants.

        Returns:
            The new lease.

        Raises:
            LeaseError: ``amount`` does not fit in ``free()``, or the id exists.
            ValueError: Empty id or holder, or a bad duration.
        """
        return self.insert(lease_id, holder, amount, duration_seconds, kind)

    def statistics(self) -> ResourceLedgerStatistics:
        """Return lease counts, capacity and free resources."""
        num_temporary, num_renewable = self._count_kinds()
        return ResourceLedgerStatistics(
            num_temporary=num_temporary,
            num_renewable=num_renewable,
            capacity=self._capacity,
            free=self.free(),
        )
