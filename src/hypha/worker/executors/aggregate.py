"""The aggregate executor: the DiLoCo parameter server, running inside the worker.

Owns the round state machine of one job: it serves the current weights to the plan's
trainers, collects their pseudo-gradients with sample counts (each authorized against the
round plan by ``worker/authorize.py``, then checked finite and of the model's shapes), closes
a round when every expected update arrived (or at the deadline with at least the minimum),
has ``aggregate_maths.py`` compute the mean and the Nesterov step and evaluate (in a thread),
sends the new weights to the plan's trainers only, and reports ``RoundClosed`` to the
scheduler. Late updates of a closed round are dropped unread and logged. The routing of
every job's server on this worker and the job manager's runner are ``parameter_servers.py``'s.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import trio

from hypha.errors import ForbiddenError, HyphaError, NotReadyError
from hypha.net.host import Node
from hypha.protocol import messages as m
from hypha.protocol.tasks import AggregateTask
from hypha.worker.authorize import (
    Pull,
    RoundView,
    check_job_scheduler,
    check_update,
    check_weights_request,
)
from hypha.worker.executors.aggregate_maths import TORCH, OuterMaths, Update
from hypha.worker.executors.checkpoints import Checkpointer
from hypha.worker.task import Task
from hypha.worker.transfers import Transfers

logger = logging.getLogger(__name__)

PLAN_WAIT_SECONDS = 5.0
"""How long a trainer's update or weights request waits for the round plan that names it."""


@dataclass
class _Round:
    number: int
    expected: set[str] = field(default_factory=set)
    min_updates: int = 1
    max_samples: int = 0
    updates: dict[str, Update] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)
    """Trainers whose update of this round is being pulled or checked."""
    first_arrival: float | None = None
    closed: bool = False
    """Set when the round's updates are taken: one arriving later is late, not aggregated."""
    changed: trio.Event = field(default_factory=trio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


@dataclass(frozen=True, slots=True)
class ParameterServerStatistics:
    """A snapshot of one ``ParameterServer``'s counters (for telemetry)."""

    round: int
    """The round now collecting updates."""
    num_rounds_closed: int
    num_updates_aggregated: int
    num_late: int
    """Updates dropped because their round had closed (or was not the current one)."""


class ParameterServer:
    """One job's parameter server on this worker."""

    def __init__(self, node: Node, task: Task, doc: AggregateTask, transfers: Transfers) -> None:
        self._node = node
        self._task = task
        self._doc = doc
        self._transfers = transfers
        self._maths: OuterMaths | None = None
        self.round = _Round(0, min_updates=doc.min_updates)
        self._weights: dict[int, Path] = {}
        self._finished = trio.Event()
        self._num_late = self._num_rounds_closed = self._num_aggregated = 0
        self._nursery: trio.Nursery | None = None
        self.checkpoints: Checkpointer | None = None
        if doc.checkpoint is not None:
            self.checkpoints = Checkpointer(doc.checkpoint, doc.job_id, doc.rounds)

    def statistics(self) -> ParameterServerStatistics:
        """Return a snapshot of the counters."""
        return ParameterServerStatistics(
            round=self.round.number,
            num_rounds_closed=self._num_rounds_closed,
            num_updates_aggregated=self._num_aggregated,
            num_late=self._num_late,
        )

    @property
    def num_late(self) -> int:
        """``statistics().num_late`` (kept for readers of the old attribute)."""
        return self._num_late

    # --- requests routed here by ``ParameterServers`` ---------------------------------------

    def _view(self, current: _Round) -> RoundView:
        return RoundView(
            number=current.number,
            trainers=current.expected,
            received=set(current.updates) | current.pending,
            max_samples=current.max_samples,
            max_bytes=self._maths.max_update_bytes if self._maths is not None else 0,
        )

    async def _wait_in_plan(self, peer: str) -> _Round:
        """The current round, once ``peer`` is in its plan (or after ``PLAN_WAIT_SECONDS``).

        A trainer's first request can overtake the plan that names it (the scheduler sends
        the plan right after the dispatch): it is given a moment before it is refused.
        """
        with trio.move_on_after(PLAN_WAIT_SECONDS):
            while peer not in self.round.expected:
                await self.round.changed.wait()
        return self.round

    async def receive_update(self, offer: m.TensorOffer, sender: str, pull: Pull) -> str:
        """Authorize, pull and keep ``sender``'s update (``authorize.UpdateSink``)."""
        if self._maths is None:
            raise ForbiddenError("the parameter server is still starting")
        current = await self._wait_in_plan(sender)
        check_update(self._view(current), offer, sender)
        if offer.round < current.number or current.closed:
            return self._late(offer, sender, current)
        current.pending.add(sender)
        dest = self._task.work_dir / "incoming" / f"{offer.transfer_id}.safetensors"
        try:
            await trio.Path(dest.parent).mkdir(exist_ok=True)
            await pull(dest)
            problem = await trio.to_thread.run_sync(self._maths.check_update, dest, limiter=TORCH)
            if problem:
                await trio.Path(dest).unlink(missing_ok=True)
                raise ForbiddenError(f"update refused: {problem}")
        finally:
            current.pending.discard(sender)
        if self.round is not current or current.closed:
            await trio.Path(dest).unlink(missing_ok=True)
            return self._late(offer, sender, current)
        current.updates[sender] = Update(sender, offer.samples, dest)
        if current.first_arrival is None:
            current.first_arrival = trio.current_time()
        current.notify()
        return ""

    def _late(self, offer: m.TensorOffer, sender: str, current: _Round) -> str:
        self._num_late += 1
        state = "closing" if current.closed else "open"
        logger.warning(
            "dropped update of round %d from %s: round %d is %s",
            offer.round,
            sender,
            self.round.number,
            state,
        )
        return f"late: round {offer.round} is closed; dropped"

    async def on_plan(self, peer: str, plan: m.RoundPlan) -> None:
        check_job_scheduler(peer, self._doc.scheduler, "a round plan")
        # The scheduler may still be a round behind (its RoundClosed is on the way): the
        # membership it sends is the newest there is, so it applies to the open round too.
        if plan.round in (self.round.number, self.round.number - 1):
            self.round.expected = set(plan.trainers)
            self.round.min_updates = plan.min_updates
            self.round.max_samples = plan.max_samples
            self.round.notify()

    async def on_weights_request(self, peer: str, request: m.WeightsRequest) -> m.TensorOffer:
        if peer != self._doc.scheduler:
            await self._wait_in_plan(peer)
        check_weights_request(self._view(self.round), peer, self._doc.scheduler)
        number = self.round.number if request.round is None else request.round
        path = self._weights.get(number) or self._weights.get(self.round.number)
        if path is None:
            raise NotReadyError("weights are not ready yet")
        served = number if number in self._weights else self.round.number
        return await self._transfers.bulk.offer(
            path,
            receiver=peer,
            purpose="weights",
            name=path.name,
            job_id=self._doc.job_id,
            round=served,
            encoding=self._maths.weights_encoding if self._maths else "fp32",
        )

    async def on_finished(self, peer: str) -> None:
        check_job_scheduler(peer, self._doc.scheduler, "the job's end")
        self._finished.set()

    # --- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        self._maths = await trio.to_thread.run_sync(OuterMaths, self._doc, self._task.work_dir, limiter=TORCH)
        start = 0
        if self.checkpoints is not None:
            await self.checkpoints.open()
            start = await self.checkpoints.restore(self._maths) or 0
            # A plan may have come while the store was read: the membership carries over.
            old = self.round
            self.round = _Round(
                start, expected=set(old.expected), min_updates=old.min_updates, max_samples=old.max_samples
            )
            old.notify()
        await self._publish_weights(start)
        await self._load_eval()
        await self._report(m.ParameterServerReady(job_id=self._doc.job_id, round=start))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._wait_finished, nursery.cancel_scope)
            while self.round.number < self._doc.rounds:
                await self._close_round()
            await self._finished.wait()

    async def _wait_finished(self, scope: trio.CancelScope) -> None:
        await self._finished.wait()
        if self.checkpoints is not None:
            await self.checkpoints.drain()  # the final checkpoint commits before the job ends
        await self._send_final_model()
        scope.cancel()

    async def _publish_weights(self, number: int) -> None:
        assert self._maths is not None
        path = self._task.work_dir / f"weights-{number:05d}.safetensors"
        await trio.to_thread.run_sync(self._maths.write_weights, path, number, limiter=TORCH)
        self._weights[number] = path
        for old in [n for n in self._weights if n < number - 1]:
            await trio.Path(self._weights.pop(old)).unlink(missing_ok=True)

    async def _load_eval(self) -> None:
        doc = self._doc
        if doc.eval_index is None or not doc.providers:
            return
        from hypha.data.cache import SliceRef

        ref = SliceRef(dataset=doc.dataset, index=doc.eval_index, sha256=doc.eval_sha256)
        self._transfers.set_providers(ref, list(doc.providers))
        assert self._maths is not None
        maths = self._maths
        try:
            # Pinned while torch reads it: a trainer's slice fetch on this worker could evict it.
            async with self._transfers.cache.open(ref) as path:
                await trio.to_thread.run_sync(
                    maths.load_eval, path, doc.batch_size, doc.eval_batches, limiter=TORCH
                )
        except HyphaError as exc:
            logger.warning("no held-out slice for evaluation: %s", exc)

    def _deadline(self, current: _Round) -> float:
        """When ``current`` closes without every expected update (inf while too few are in)."""
        if current.first_arrival is None or len(current.updates) < max(1, current.min_updates):
            return math.inf
        return current.first_arrival + self._doc.round_deadline_seconds

    def _ready(self, current: _Round) -> bool:
        if current.expected and current.expected <= set(current.updates):
            return True
        return trio.current_time() >= self._deadline(current)

    async def _close_round(self) -> None:
        current = self.round
        while not self._ready(current):
            # No deadline while too few updates are in: a past one would make this loop spin.
            with trio.move_on_at(self._deadline(current)):
                await current.changed.wait()
        current.closed = True  # before the first await: a later update must not be lost silently
        # In worker order, not arrival order: the float sums are then reproducible.
        updates = [current.updates[worker] for worker in sorted(current.updates)]
        assert self._maths is not None
        await trio.to_thread.run_sync(self._maths.step, updates, limiter=TORCH)
        loss = await trio.to_thread.run_sync(self._maths.evaluate, limiter=TORCH)
        samples = sum(u.samples for u in updates)
        self._num_rounds_closed += 1
        self._num_aggregated += len(updates)
        for update in updates:  # next round's updates overwrite these files (same size)
            self._transfers.bulk.recycle(update.path)
        self.round = _Round(
            current.number + 1,
            expected=set(current.expected),
            min_updates=current.min_updates,
            max_samples=current.max_samples,
        )
        current.notify()  # requests waiting for a plan go on with the new round
        await self._publish_weights(current.number + 1)
        if self.checkpoints is not None and self.checkpoints.due(current.number + 1):
            assert self._nursery is not None
            await self.checkpoints.take(self._maths, current.number + 1, self._nursery)
            if current.number + 1 >= self._doc.rounds:
                await self.checkpoints.drain()  # the scheduler hears of the final checkpoint
        # Only the plan's trainers: a sender that is no longer in it gets nothing.
        recipients = sorted(current.expected)
        logger.info(
            "round %d closed: %d updates, %d samples, loss %s", current.number, len(updates), samples, loss
        )
        await self._broadcast(current.number, recipients)
        await self._report(
            m.RoundClosed(
                job_id=self._doc.job_id,
                round=current.number,
                num_updates=len(updates),
                samples=samples,
                loss=loss,
                checkpoint=self.checkpoints.last if self.checkpoints is not None else "",
            )
        )

    async def _broadcast(self, number: int, recipients: list[str]) -> None:
        assert self._maths is not None
        path = self._task.work_dir / f"delta-{number:05d}.safetensors"
        await trio.to_thread.run_sync(self._maths.write_delta, path, number, limiter=TORCH)
        encoding = self._maths.delta_encoding

        async def one(peer: str) -> None:
            try:
                await self._transfers.push(
                    path, [peer], purpose="weights", job_id=self._doc.job_id, round_=number, encoding=encoding
                )
            except HyphaError as exc:
                logger.warning("weights of round %d not delivered to %s: %s", number, peer, exc)

        async with trio.open_nursery() as nursery:
            for peer in recipients:
                nursery.start_soon(one, peer)
        await trio.Path(path).unlink(missing_ok=True)

    async def _report(self, msg: m.Msg) -> None:
        try:
            await self._node.request(self._doc.scheduler, msg, m.Ack)
        except HyphaError as exc:
            logger.warning("scheduler did not take %s: %s", type(msg).__name__, exc)

    async def _send_final_model(self) -> None:
        assert self._maths is not None
        path = self._task.work_dir / "model.safetensors"
        await trio.to_thread.run_sync(
            self._maths.write_weights, path, self.round.number, "fp32", limiter=TORCH
        )
        try:
            await self._transfers.push(
                path,
                [self._doc.scheduler],
                purpose="weights",
                job_id=self._doc.job_id,
                round_=self.round.number,
                name="model.safetensors",
            )
        except HyphaError as exc:
            logger.error("final model not delivered to the scheduler: %s", exc)
