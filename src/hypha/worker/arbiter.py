"""The worker's arbiter: answers advertisements it can serve, at its price.

Owns the offer side of allocation (ARCHITECTURE.md section 5): batching ``WorkerRequest``s
from the ``hypha/worker`` topic over a short window, dropping those the worker cannot serve
(executor not configured, resources larger than free, bid below the floor, expired), ranking
the rest by profit, reserving resources under a temporary lease and sending an ``Offer`` to
the scheduler, whose explicit answer either promotes the lease or frees it at once.
Renewal, release and expiry of leases are ``worker/leases.py``'s job.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from hypha.config.schema import ExecutorSection, OfferSection
from hypha.errors import HyphaError, LeaseError
from hypha.net.host import Node
from hypha.net.pubsub import Received
from hypha.protocol import ids
from hypha.protocol import messages as m
from hypha.resources import Resources, ResourceWeights, price_per_unit
from hypha.worker.leases import WorkerLeases

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """An advertisement this worker can serve, with what it would offer."""

    request: m.WorkerRequest
    amount: Resources
    price: float

    @property
    def profit(self) -> float:
        """Price per weighted unit offered: higher is better for the worker."""
        return price_per_unit(self.price, self.amount, ResourceWeights())


@dataclass(frozen=True, slots=True)
class ArbiterStatistics:
    """A snapshot of an ``Arbiter``'s counters (for telemetry)."""

    num_adverts: int
    num_dropped: int
    """Advertisements this worker could not serve (see ``evaluate``)."""
    num_offers: int
    num_accepted: int
    num_rejected: int
    """Offers the scheduler refused, never answered, or that could not be kept."""


def serves_executors(wanted: Sequence[m.ExecutorDescriptor], executors: Sequence[ExecutorSection]) -> bool:
    """True if every wanted executor (class and name) is configured on this worker."""
    have = {(e.executor_class, e.name) for e in executors}
    return all((w.executor_class, w.name) in have for w in wanted)


def evaluate(
    request: m.WorkerRequest,
    free: Resources,
    offer: OfferSection,
    executors: Sequence[ExecutorSection],
    now_unix: float,
) -> Candidate | str:
    """Decide whether and what to offer for ``request``; a string says why not."""
    if request.expires_at < now_unix:
        return "expired"
    if not serves_executors(request.executors, executors):
        return "executor not configured"
    if request.bid < offer.floor:
        return f"bid {request.bid} below floor {offer.floor}"
    try:
        wanted = Resources.from_spec(request.resources)
    except ValueError as exc:
        return f"bad resources: {exc}"
    if not wanted.fits_in(free):
        return f"needs {wanted}, only {free} free"
    if offer.strategy == "whole":
        return Candidate(request, free, max(offer.price, request.bid))
    return Candidate(request, wanted, request.bid)


def rank(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Most profitable first; ties by request id for determinism."""
    return sorted(candidates, key=lambda c: (-c.profit, -c.request.bid, c.request.id))


class Arbiter:
    """Turns advertisements into offers and accepted offers into leases."""

    def __init__(
        self,
        node: Node,
        leases: WorkerLeases,
        offer: OfferSection,
        executors: Sequence[ExecutorSection],
        *,
        offer_window_seconds: float,
        batch_window_seconds: float,
    ) -> None:
        self._node = node
        self._leases = leases
        self._ledger = leases.ledger
        self._offer = offer
        self._executors = list(executors)
        self._offer_window = offer_window_seconds
        self._batch_window = batch_window_seconds
        self._num_adverts = self._num_dropped = self._num_offers = 0
        self._num_accepted = self._num_rejected = 0

    def statistics(self) -> ArbiterStatistics:
        """Return a snapshot of the counters."""
        return ArbiterStatistics(
            num_adverts=self._num_adverts,
            num_dropped=self._num_dropped,
            num_offers=self._num_offers,
            num_accepted=self._num_accepted,
            num_rejected=self._num_rejected,
        )

    @property
    def stats(self) -> ArbiterStatistics:
        """``statistics()`` (kept for readers of the old attribute)."""
        return self.statistics()

    def set_batch_window(self, seconds: float) -> None:
        """Change how long advertisements are collected before offering."""
        if seconds <= 0:
            raise ValueError("batch window must be positive")
        self._batch_window = seconds

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve advertisements until cancelled."""
        async with (
            self._node.gossip.subscribe(ids.WORKER_TOPIC, m.WorkerRequest, roles={"scheduler"}) as adverts,
            trio.open_nursery() as nursery,
        ):
            task_status.started()
            while True:
                batch = [await adverts.receive()]
                with trio.move_on_after(self._batch_window):
                    async for item in adverts:
                        batch.append(item)
                await self._handle_batch(batch, nursery)

    async def _handle_batch(self, batch: list[Received[m.WorkerRequest]], nursery: trio.Nursery) -> None:
        now_unix = time.time()
        seen: set[str] = set()
        candidates: list[Candidate] = []
        for item in batch:
            request = item.message
            self._num_adverts += 1
            if request.id in seen or item.origin != request.scheduler:
                continue
            seen.add(request.id)
            verdict = evaluate(request, self._ledger.free(), self._offer, self._executors, now_unix)
            if isinstance(verdict, str):
                self._num_dropped += 1
                logger.debug("not offering for %s: %s", request.id, verdict)
                continue
            candidates.append(verdict)
        for candidate in rank(candidates):
            # Re-check against what earlier candidates of this batch reserved.
            verdict = evaluate(candidate.request, self._ledger.free(), self._offer, self._executors, now_unix)
            if isinstance(verdict, str):
                continue
            lease_id = uuid.uuid4().hex
            try:
                self._ledger.reserve(lease_id, verdict.request.scheduler, verdict.amount, self._offer_window)
            except LeaseError:
                continue
            self._leases.changed()
            nursery.start_soon(self._offer_and_wait, lease_id, verdict)

    async def _offer_and_wait(self, lease_id: str, candidate: Candidate) -> None:
        request = candidate.request
        offer = m.OfferRequest(
            lease_id=lease_id,
            request_id=request.id,
            worker=self._node.peer_id,
            price=candidate.price,
            resources=candidate.amount.to_spec(),
            expires_at=time.time() + self._offer_window,
        )
        self._num_offers += 1
        decision: m.OfferDecision | None = None
        try:
            with trio.fail_after(self._offer_window):
                self._node.remember_addresses(request.scheduler, request.addresses)
                await self._node.ensure_connected(request.scheduler)
                role = self._node.directory.role(request.scheduler)
                if role != "scheduler":
                    raise LeaseError(f"advertiser {request.scheduler} has role {role}, not scheduler")
                decision = await self._node.request(request.scheduler, offer, m.OfferDecision)
        except (HyphaError, trio.TooSlowError) as exc:
            logger.info("offer %s to %s got no decision: %s", lease_id, request.scheduler, exc)
        if decision is not None and decision.accepted and decision.lease_seconds > 0:
            try:
                self._ledger.promote(lease_id, request.scheduler, decision.lease_seconds)
                self._leases.remember_duration(lease_id, decision.lease_seconds)
                self._num_accepted += 1
                logger.info("leased to %s (%s) at %.3f", request.scheduler, lease_id, candidate.price)
                self._leases.changed()
                return
            except LeaseError as exc:
                logger.warning("accepted offer %s could not be kept: %s", lease_id, exc)
        self._num_rejected += 1
        self._ledger.remove(lease_id)
        self._leases.changed()
