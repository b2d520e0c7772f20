"""The scheduler's side of allocation: advertise, collect offers, decide, keep leases.

Owns publishing ``WorkerRequest``s (re-published with backoff while offers are missing, so
workers freed by another scheduler's rejection can still answer), collecting ``Offer``s until the deadline or
until enough have arrived and settled, dropping offers above the private maximum, ranking by
price per weighted unit (one offer per worker), answering every offer explicitly, and
renewing accepted leases at 75% of their lifetime. Pools (``pool.py``) decide how many.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from hypha.errors import HyphaError
from hypha.net.iface import Network
from hypha.protocol import ids
from hypha.protocol import messages as m
from hypha.resources import Resources, ResourceWeights, price_per_unit

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """What a pool member must provide."""

    resources: Resources
    executors: tuple[m.ExecutorDescriptor, ...]


@dataclass(frozen=True)
class Price:
    """``bid`` is advertised; ``max_price`` is private: offers above it are refused."""

    bid: float
    max_price: float


@dataclass
class Grant:
    """An accepted offer: a renewable lease on one worker."""

    lease_id: str
    worker: str
    price: float
    resources: Resources
    lease_seconds: float
    expires_at: float
    """Local ``trio.current_time()`` at which the lease lapses unless renewed."""


@dataclass
class _Pending:
    offer: m.OfferRequest
    peer: str
    decided: trio.Event = field(default_factory=trio.Event)
    accepted: bool = False
    answered: bool = False
    """The worker already got its answer (a timeout counts as rejected)."""


@dataclass
class _Collector:
    request: m.WorkerRequest
    offers: list[_Pending] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)
    closed: bool = False
    last_arrival: float = 0.0


@dataclass(frozen=True, slots=True)
class AllocatorStatistics:
    """Snapshot of the allocator's counters for telemetry."""

    num_requests: int = 0
    num_offers: int = 0
    num_accepted: int = 0
    num_rejected: int = 0
    num_renewals: int = 0
    num_lost: int = 0


class Allocator:
    """Advertises on behalf of pools and turns offers into leases."""

    def __init__(
        self,
        node: Network,
        *,
        lease_seconds: float,
        offer_deadline_seconds: float,
        settle_seconds: float = 0.15,
        republish_seconds: float = 0.4,
        weights: ResourceWeights | None = None,
    ) -> None:
        self._node = node
        self._lease_seconds = lease_seconds
        self._deadline = offer_deadline_seconds
        self._settle = settle_seconds
        self._republish = republish_seconds
        self._weights = weights or ResourceWeights()
        self._collectors: dict[str, _Collector] = {}
        self._counts: dict[str, int] = dict.fromkeys(AllocatorStatistics.__slots__, 0)
        node.rpc.register(m.OfferRequest, self._on_offer, roles={"worker"})

    def set_policy(
        self, *, settle_seconds: float, republish_seconds: float, lease_seconds: float | None = None
    ) -> None:
        """Change how offers are collected (benchmarks compare policies on one node)."""
        self._settle = settle_seconds
        self._republish = republish_seconds
        if lease_seconds is not None:
            self._lease_seconds = lease_seconds

    async def _on_offer(self, peer: str, offer: m.OfferRequest) -> m.OfferDecision:
        collector = self._collectors.get(offer.request_id)
        if collector is None or collector.closed or offer.worker != peer:
            return m.OfferDecision(lease_id=offer.lease_id, accepted=False)
        pending = _Pending(offer, peer)
        collector.offers.append(pending)
        collector.last_arrival = trio.current_time()
        self._counts["num_offers"] += 1
        collector.changed.set()
        collector.changed = trio.Event()
        # Answer before the worker's reservation lapses, whatever happens here.
        with trio.move_on_at(trio.current_time() + max(0.0, offer.expires_at - time.time())):
            await pending.decided.wait()
        pending.answered = True
        return m.OfferDecision(
            lease_id=offer.lease_id,
            accepted=pending.accepted,
            lease_seconds=self._lease_seconds if pending.accepted else 0.0,
        )

    def _rank(self, offers: list[_Pending], price: Price) -> list[_Pending]:
        """Live affordable offers, best (lowest price per weighted unit) first, one per worker."""
        best: dict[str, tuple[float, _Pending]] = {}
        for p in offers:
            if p.offer.price > price.max_price or p.answered:
                continue
            try:
                score = price_per_unit(p.offer.price, Resources.from_spec(p.offer.resources), self._weights)
            except ValueError:
                continue
            if p.peer not in best or score < best[p.peer][0]:
                best[p.peer] = (score, p)
        return [p for _, p in sorted(best.values(), key=lambda sp: (sp[0], sp[1].peer))]

    async def allocate(
        self, spec: WorkerSpec, price: Price, count: int, *, exclude: frozenset[str] = frozenset()
    ) -> list[Grant]:
        """Lease up to ``count`` workers matching ``spec``; may return fewer (or none).

        Cancellation: offers still waiting are rejected, so workers free their reservations.
        """
        if count <= 0:
            return []
        request = m.WorkerRequest(
            id=uuid.uuid4().hex,
            scheduler=self._node.peer_id,
            resources=spec.resources.to_spec(),
            executors=list(spec.executors),
            bid=price.bid,
            expires_at=time.time() + self._deadline,
            addresses=self._node.listen_addrs()[:4],
        )
        collector = _Collector(request)
        self._collectors[request.id] = collector
        self._counts["num_requests"] += 1
        deadline = trio.current_time() + self._deadline
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._advertise, collector, count, deadline)
                await self._collect(collector, price, count, deadline, exclude)
                nursery.cancel_scope.cancel()
            return self._decide(collector, price, count, exclude)
        finally:
            collector.closed = True
            for pending in collector.offers:
                pending.decided.set()
            self._collectors.pop(request.id, None)

    async def _advertise(self, collector: _Collector, count: int, deadline: float) -> None:
        """Publish now, then again while offers are missing, backing off each time.

        Every publish floods the topic once more, so a slow or loaded network is not asked
        for ever more traffic exactly when it is behind.
        """
        interval = self._republish
        while trio.current_time() < deadline:
            if len(collector.offers) < count:
                try:
                    await self._node.gossip.publish(ids.WORKER_TOPIC, collector.request)
                except HyphaError as exc:
                    logger.warning("advertisement %s not published: %s", collector.request.id, exc)
            await trio.sleep(interval)
            interval *= 2

    async def _collect(
        self,
        collector: _Collector,
        price: Price,
        count: int,
        deadline: float,
        exclude: frozenset[str],
    ) -> None:
        while trio.current_time() < deadline:
            ranked = [p for p in self._rank(collector.offers, price) if p.peer not in exclude]
            enough = len(ranked) >= count
            until = min(deadline, collector.last_arrival + self._settle) if enough else deadline
            if ranked:
                # Decide while every offer we would take is still reserved for us.
                earliest = min(p.offer.expires_at for p in ranked[:count]) - time.time() - 0.2
                until = min(until, trio.current_time() + max(0.0, earliest))
                if earliest <= 0:
                    return
            if enough and trio.current_time() >= until:
                return
            with trio.move_on_at(until):
                await collector.changed.wait()

    def _decide(
        self, collector: _Collector, price: Price, count: int, exclude: frozenset[str]
    ) -> list[Grant]:
        collector.closed = True
        ranked = [p for p in self._rank(collector.offers, price) if p.peer not in exclude]
        chosen = {id(p) for p in ranked[:count]}
        grants: list[Grant] = []
        now = trio.current_time()
        for pending in collector.offers:
            pending.accepted = id(pending) in chosen
            if pending.accepted:
                self._counts["num_accepted"] += 1
                grants.append(
                    Grant(
                        lease_id=pending.offer.lease_id,
                        worker=pending.peer,
                        price=pending.offer.price,
                        resources=Resources.from_spec(pending.offer.resources),
                        lease_seconds=self._lease_seconds,
                        expires_at=now + self._lease_seconds,
                    )
                )
            else:
                self._counts["num_rejected"] += 1
            pending.decided.set()
        grants.sort(key=lambda g: [p.peer for p in ranked].index(g.worker))
        logger.info(
            "request %s: %d offers, %d accepted",
            collector.request.id,
            len(collector.offers),
            len(grants),
        )
        return grants

    def statistics(self) -> AllocatorStatistics:
        return AllocatorStatistics(**self._counts)

    async def keep(self, grant: Grant, on_renewed: Callable[[Grant], None] | None = None) -> str:
        """Renew ``grant`` at 75% of its lifetime until it is lost; return why.

        Each renewal moves ``grant.expires_at`` and then calls ``on_renewed(grant)``.
        Returns when the worker answers ``LeaseGone`` or no renewal succeeds before the lease
        lapses. Cancel the caller's scope to stop renewing (then call ``release``).
        """
        while True:
            await trio.sleep_until(grant.expires_at - 0.25 * grant.lease_seconds)
            while True:
                try:
                    with trio.fail_after(max(0.05, grant.expires_at - trio.current_time())):
                        reply = await self._node.request(
                            grant.worker, m.RenewLeaseRequest(lease_id=grant.lease_id), m.Msg
                        )
                except trio.TooSlowError:
                    self._counts["num_lost"] += 1
                    return "renewal not answered before the lease lapsed"
                except HyphaError as exc:
                    if trio.current_time() >= grant.expires_at:
                        self._counts["num_lost"] += 1
                        return f"renewal failed: {exc}"
                    await trio.sleep(min(0.1, grant.lease_seconds / 20))
                    continue
                break
            if isinstance(reply, m.LeaseRenewed):
                self._counts["num_renewals"] += 1
                grant.expires_at = trio.current_time() + reply.lease_seconds
                if on_renewed is not None:
                    on_renewed(grant)
                continue
            self._counts["num_lost"] += 1
            reason = reply.reason if isinstance(reply, m.LeaseGone) else f"unexpected {type(reply).__name__}"
            return f"lease gone: {reason}"

    async def release(self, grant: Grant) -> None:
        """Tell the worker we are done with the lease (best effort)."""
        with trio.move_on_after(self._node.settings.rpc_timeout_seconds) as scope:
            scope.shield = True
            try:
                await self._node.request(grant.worker, m.ReleaseLeaseRequest(lease_id=grant.lease_id), m.Ack)
            except HyphaError as exc:
                logger.info("release of %s on %s: %s", grant.lease_id, grant.worker, exc)
