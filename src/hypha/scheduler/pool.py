"""Worker pools: keep ``target`` members of a role leased, replace the lost ones.

Owns one role's membership (trainers, the parameter server): a reconcile loop that
allocates up to ``target``, keeps each member's lease alive through the allocator, removes
members whose lease is lost and allocates replacements, and fails the job only when the pool
stays below ``min`` for longer than ``grace_seconds``. Nothing is announced on a channel
that could fill up and drop a change: the pool's state is its ``members`` (by worker, each
with its lease), and ``wait_changed`` wakes whoever follows it (the job driver reconciles
its tasks against the members; a worker re-leased between two looks has a new lease id, so
no change is ever missed). Why a member was lost is kept by lease id (``loss_reason``). A
member whose certificate is revoked is lost at once (``peer_revoked``, for
``Node.on_peer_revoked``) and never leased again by this pool, as is one the job excludes
(``exclude``: its tasks keep failing).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import trio

from hypha.errors import JobError
from hypha.scheduler.allocator import Grant, Price, WorkerSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolSpec:
    """How many workers of one kind a job wants, and at what price."""

    name: str
    worker: WorkerSpec
    price: Price
    min: int
    target: int
    grace_seconds: float
    retry_seconds: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.target:
            raise ValueError(f"pool {self.name}: need 0 <= min <= target")


class Leaser(Protocol):
    """What a pool needs to lease workers (``Allocator`` is the real one)."""

    async def allocate(
        self, spec: WorkerSpec, price: Price, count: int, *, exclude: frozenset[str] = frozenset()
    ) -> list[Grant]: ...

    async def keep(self, grant: Grant, on_renewed: RenewHook | None = None) -> str: ...

    async def release(self, grant: Grant) -> None: ...


class RenewHook(Protocol):
    def __call__(self, grant: Grant) -> None: ...


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """Snapshot of one pool for telemetry."""

    name: str
    num_members: int
    target: int
    min: int
    num_joined: int
    num_lost: int
    num_renewals: int
    below_min_since: float | None
    """``trio.current_time()`` since which the pool is below ``min``, if it is."""


MAX_REASONS = 1024
"""Loss reasons kept (oldest forgotten first): the driver reads each soon after the loss."""


class Pool:
    """A reconciled set of leased workers."""

    def __init__(self, spec: PoolSpec, leaser: Leaser) -> None:
        self.spec = spec
        self._leaser = leaser
        self.members: dict[str, Grant] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._changed = trio.Event()
        self._below_min_since: float | None = None
        self._reasons: OrderedDict[str, str] = OrderedDict()
        self._excluded: set[str] = set()
        self._num_lost = 0
        self._num_joined = 0
        self._num_renewals = 0
        self.version = 0
        """Bumped on every change of membership or of a member's lease expiry."""

    def workers(self) -> list[str]:
        return list(self.members)

    def loss_reason(self, lease_id: str) -> str:
        """Why the member holding ``lease_id`` was lost ("" if unknown or still a member)."""
        return self._reasons.get(lease_id, "")

    async def wait_size(self, size: int) -> None:
        """Wait until the pool holds at least ``size`` members."""
        while len(self.members) < size:
            await self._changed.wait()

    async def wait_changed(self, version: int) -> None:
        """Wait until the pool's ``version`` is newer than ``version`` (at once if it is)."""
        while self.version <= version:
            await self._changed.wait()

    def _notify(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = trio.Event()

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(
            name=self.spec.name,
            num_members=len(self.members),
            target=self.spec.target,
            min=self.spec.min,
            num_joined=self._num_joined,
            num_lost=self._num_lost,
            num_renewals=self._num_renewals,
            below_min_since=self._below_min_since,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reconcile until cancelled; raises ``JobError`` when below ``min`` past the grace.

        Cancellation: every member's lease is released.
        """
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    self._check_minimum()
                    missing = self.spec.target - len(self.members)
                    if missing > 0:
                        grants = await self._leaser.allocate(
                            self.spec.worker,
                            self.spec.price,
                            missing,
                            exclude=frozenset(self.members) | self._excluded,
                        )
                        for grant in grants:
                            self._join(grant, nursery)
                        self._check_minimum()
                        if len(self.members) < self.spec.target:
                            with trio.move_on_after(self.spec.retry_seconds):
                                await self._changed.wait()
                        continue
                    await self._wait_change_or_grace()
        finally:
            with trio.CancelScope(shield=True):
                await self.release(self.members.values())

    async def _wait_change_or_grace(self) -> None:
        if self._below_min_since is None:
            await self._changed.wait()
            return
        with trio.move_on_at(self._below_min_since + self.spec.grace_seconds):
            await self._changed.wait()

    def _check_minimum(self) -> None:
        now = trio.current_time()
        if len(self.members) >= self.spec.min:
            self._below_min_since = None
            return
        if self._below_min_since is None:
            self._below_min_since = now
        elif now - self._below_min_since > self.spec.grace_seconds:
            raise JobError(
                f"pool {self.spec.name} stayed below its minimum of {self.spec.min} "
                f"for more than {self.spec.grace_seconds:g} s (has {len(self.members)})"
            )

    def _join(self, grant: Grant, nursery: trio.Nursery) -> None:
        self.members[grant.worker] = grant
        self._num_joined += 1
        scope = trio.CancelScope()
        self._scopes[grant.worker] = scope
        nursery.start_soon(self._keep, grant, scope)
        logger.info(
            "pool %s: %s joined (%d/%d)",
            self.spec.name,
            grant.worker,
            len(self.members),
            self.spec.target,
        )
        self._notify()

    async def _keep(self, grant: Grant, scope: trio.CancelScope) -> None:
        with scope:
            reason = await self._leaser.keep(grant, self._renewed)
            self.lose(grant.worker, reason)

    def _renewed(self, grant: Grant) -> None:
        if self.members.get(grant.worker) is grant:
            self._num_renewals += 1
            self._notify()

    def lose(self, worker: str, reason: str) -> None:
        """Drop ``worker`` (lost lease, failed task); the reconcile loop replaces it."""
        grant = self.members.pop(worker, None)
        if grant is None:
            return
        scope = self._scopes.pop(worker, None)
        if scope is not None:
            scope.cancel()
        self._num_lost += 1
        self._reasons[grant.lease_id] = reason
        while len(self._reasons) > MAX_REASONS:
            self._reasons.popitem(last=False)
        logger.warning("pool %s: lost %s: %s", self.spec.name, worker, reason)
        self._notify()

    async def peer_revoked(self, peer: str) -> None:
        """``peer``'s certificate was revoked: lose it if a member, and never lease it again.

        The revoked peer cannot connect any more, so its lease is not released: the worker
        ends it on its side when it learns of the revocation (or when it lapses).
        """
        self.exclude(peer, "its certificate was revoked")

    def exclude(self, worker: str, reason: str) -> None:
        """Lose ``worker`` if a member, and never lease it again in this pool."""
        self._excluded.add(worker)
        self.lose(worker, reason)

    async def release(self, grants: Iterable[Grant]) -> None:
        for grant in list(grants):
            await self._leaser.release(grant)
