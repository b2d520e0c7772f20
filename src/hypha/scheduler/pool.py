"""Worker pools: keep ``target`` members of a role leased, replace the lost ones.

Owns one role's membership (trainers, the parameter server): a reconcile loop that
allocates up to ``target``, keeps each member's lease alive through the allocator, removes
members whose lease is lost and allocates replacements, and fails the job only when the pool
stays below ``min`` for longer than ``grace_seconds``. Joins and losses are announced on a
channel so the job can hand work to newcomers and re-plan without the lost ones.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import trio

from hypha.errors import JobError
from hypha.scheduler.allocator import Allocator, Grant, Price, WorkerSpec

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


@dataclass(frozen=True)
class PoolEvent:
    kind: Literal["joined", "lost"]
    pool: str
    worker: str
    reason: str = ""


class Pool:
    """A reconciled set of leased workers."""

    def __init__(
        self, spec: PoolSpec, allocator: Allocator, events: trio.MemorySendChannel[PoolEvent]
    ) -> None:
        self.spec = spec
        self._allocator = allocator
        self._events = events
        self.members: dict[str, Grant] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._changed = trio.Event()
        self._below_min_since: float | None = None
        self.num_lost = 0
        self.num_joined = 0

    def workers(self) -> list[str]:
        return list(self.members)

    async def wait_size(self, size: int) -> None:
        """Wait until the pool holds at least ``size`` members."""
        while len(self.members) < size:
            await self._wait_change()

    async def _wait_change(self) -> None:
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

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
                        grants = await self._allocator.allocate(
                            self.spec.worker,
                            self.spec.price,
                            missing,
                            exclude=frozenset(self.members),
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
        self.num_joined += 1
        scope = trio.CancelScope()
        self._scopes[grant.worker] = scope
        nursery.start_soon(self._keep, grant, scope)
        self._emit(PoolEvent("joined", self.spec.name, grant.worker))
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
            reason = await self._allocator.keep(grant)
            self.lose(grant.worker, reason)

    def lose(self, worker: str, reason: str) -> None:
        """Drop ``worker`` (lost lease, failed task); the reconcile loop replaces it."""
        grant = self.members.pop(worker, None)
        if grant is None:
            return
        scope = self._scopes.pop(worker, None)
        if scope is not None:
            scope.cancel()
        self.num_lost += 1
        logger.warning("pool %s: lost %s: %s", self.spec.name, worker, reason)
        self._emit(PoolEvent("lost", self.spec.name, worker, reason))
        self._notify()

    async def release(self, grants: Iterable[Grant]) -> None:
        for grant in list(grants):
            await self._allocator.release(grant)

    def _emit(self, event: PoolEvent) -> None:
        try:
            self._events.send_nowait(event)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            logger.warning("pool event dropped (no listener keeping up): %s", event)
