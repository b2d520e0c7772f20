"""The job driver: one DiLoCo training job from first dispatch to the final model.

Owns the job's state machine: finding the dataset, dispatching the parameter server and the
trainers (and replacements as pools change), answering trainers' progress with the sync
planner's instructions, assigning slices, telling the parameter server which updates each
round expects, advancing rounds when it reports them closed, and collecting the results
(final model, metrics, report). Allocation and leases are ``pool.py``'s and
``allocator.py``'s; the maths lives on the parameter server and the trainers.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from hypha.config.job import JobSpec
from hypha.errors import DataError, HyphaError, JobError
from hypha.net.bulk import BulkService
from hypha.protocol import codec, ids
from hypha.protocol import messages as m
from hypha.protocol.tasks import AggregateTask, InnerDoc, ModelDoc, OuterDoc, TrainTask
from hypha.scheduler.results import JobRecorder
from hypha.scheduler.slices import SliceState, SliceTracker
from hypha.scheduler.sync import SyncPlanner

if TYPE_CHECKING:
    from hypha.data.manifest import Manifest
    from hypha.scheduler.node import SchedulerParts

logger = logging.getLogger(__name__)


@dataclass
class Member:
    worker: str
    task_id: str
    lease_id: str
    reported: bool = False


async def discover_dataset(
    parts: SchedulerParts, name: str, timeout_seconds: float
) -> tuple[list[str], Manifest]:
    """Find the providers and manifest of ``name`` in the DHT (retrying until the timeout)."""
    from hypha.data.manifest import Manifest, manifest_sha256

    node = parts.node
    key = ids.dataset_key(name)
    last = "no record"
    with trio.move_on_after(timeout_seconds):
        while True:
            try:
                record = await node.dht.get(key, m.DatasetRecord)
                providers = await node.dht.find_providers(key) if record else []
                for provider in providers:
                    try:
                        reply = await node.request(
                            provider, m.ManifestRequest(dataset=name), m.ManifestResponse
                        )
                    except HyphaError as exc:
                        last = str(exc)
                        continue
                    assert record is not None
                    if manifest_sha256(reply.manifest) != record.manifest_sha256:
                        last = f"{provider} serves a manifest that does not match the DHT record"
                        continue
                    return providers, Manifest.from_json(reply.manifest)
                last = "record found but no provider answered" if record else "no record"
            except HyphaError as exc:
                last = str(exc)
            await trio.sleep(0.5)
    raise DataError(f"dataset {name!r} not found in the network within {timeout_seconds:g} s ({last})")


class JobDriver:
    """The state of one running job."""

    def __init__(self, parts: SchedulerParts, job: JobSpec, providers: list[str], manifest: Manifest) -> None:
        self.parts = parts
        self.job = job
        self.job_id = f"{job.name}-{uuid.uuid4().hex[:8]}"
        self.providers = providers
        self.manifest = manifest
        held_out = manifest.num_slices >= 2
        self.eval_index = manifest.num_slices - 1 if held_out else None
        self.tracker = SliceTracker(manifest.num_slices - 1 if held_out else manifest.num_slices)
        self.planner = SyncPlanner(horizon_seconds=job.sync_horizon_seconds)
        self.recorder = JobRecorder(job.out, job, self.job_id)
        self.trainers: dict[str, Member] = {}
        self.ps: Member | None = None
        self.round = 0
        self.finished_rounds = 0
        self.done = False
        self.model_received = trio.Event()
        self.bulk = BulkService(parts.node)
        node = parts.node
        node.rpc.register(m.ProgressRequest, self._progress, roles={"worker"})
        node.rpc.register(m.NextSliceRequest, self._next_slice, roles={"worker"})
        node.rpc.register(m.SliceUsed, self._slice_used, roles={"worker"})
        node.rpc.register(m.SliceReturned, self._slice_returned, roles={"worker"})
        node.rpc.register(m.RoundClosed, self._round_closed, roles={"worker"})
        node.rpc.register(m.TensorPushRequest, self._final_model, roles={"worker"})
        self._round_closed_event = trio.Event()
        self._adding: set[str] = set()
        self._trainer_finished = trio.Event()

    # --- documents ------------------------------------------------------------------------

    def _model_doc(self) -> ModelDoc:
        spec = self.job.model
        return ModelDoc(
            kind=spec.kind,
            name=spec.name,
            path=str(spec.path) if spec.path else None,
            options=dict(spec.options),
        )

    def _train_doc(self) -> TrainTask:
        job = self.job
        per_trainer = job.samples_per_round // (job.batch_size * max(1, job.trainers.target))
        total_steps = max(1, job.rounds * (job.fixed_inner_steps or per_trainer))
        inner = job.inner
        assert self.ps is not None
        return TrainTask(
            job_id=self.job_id,
            model=self._model_doc(),
            dataset=job.dataset,
            batch_size=job.batch_size,
            seed=job.seed,
            inner=InnerDoc(
                lr=inner.lr,
                beta1=inner.beta1,
                beta2=inner.beta2,
                weight_decay=inner.weight_decay,
                warmup_steps=inner.warmup_steps,
                schedule=inner.schedule,
                total_steps=total_steps,
            ),
            encoding=job.encoding,
            report_every_seconds=job.report_every_seconds,
            parameter_server=self.ps.worker,
            batches_per_round=job.fixed_inner_steps,
        )

    def _aggregate_doc(self) -> AggregateTask:
        job = self.job
        eval_sha = self.manifest.slices[self.eval_index].sha256 if self.eval_index is not None else ""
        return AggregateTask(
            job_id=self.job_id,
            model=self._model_doc(),
            seed=job.seed,
            outer=OuterDoc(lr=job.outer.lr, momentum=job.outer.momentum),
            rounds=job.rounds,
            encoding=job.encoding,
            scheduler=self.parts.node.peer_id,
            min_updates=job.trainers.min,
            round_deadline_seconds=job.round_deadline_seconds,
            dataset=job.dataset,
            eval_batches=job.eval_batches,
            batch_size=job.batch_size,
            eval_index=self.eval_index,
            eval_sha256=eval_sha,
            providers=list(self.providers),
        )

    # --- dispatch ---------------------------------------------------------------------------

    async def _dispatch(self, worker: str, executor: m.ExecutorDescriptor, config: bytes) -> Member:
        pool = self.parts.parameter_server if executor.executor_class == "aggregate" else self.parts.trainers
        grant = pool.members.get(worker)
        if grant is None:
            raise JobError(f"{worker} is no longer leased")
        task_id = uuid.uuid4().hex
        request = m.DispatchTask(
            lease_id=grant.lease_id, task_id=task_id, job_id=self.job_id, executor=executor, config=config
        )
        reply = await self.parts.node.request(worker, request, m.Msg)
        if isinstance(reply, m.Refused):
            raise JobError(f"{executor.executor_class} executor on {worker} cannot start: {reply.reason}")
        codec.expect(reply, m.Dispatched)
        return Member(worker=worker, task_id=task_id, lease_id=grant.lease_id)

    async def start_parameter_server(self) -> None:
        with trio.fail_after(self.job.parameter_server.grace_seconds + 60):
            await self.parts.parameter_server.wait_size(1)
        worker = self.parts.parameter_server.workers()[0]
        descriptor = m.ExecutorDescriptor(executor_class="aggregate", name=self.job.parameter_server.executor)
        self.ps = await self._dispatch(worker, descriptor, codec.encode_json(self._aggregate_doc()))
        logger.info("parameter server on %s", worker)

    async def add_trainer(self, worker: str) -> None:
        if worker in self.trainers or worker in self._adding or self.done:
            return
        self._adding.add(worker)
        try:
            await self._add_trainer(worker)
        finally:
            self._adding.discard(worker)

    def _restripe(self) -> None:
        """Stripe fresh slices over every leased trainer, dispatched or not."""
        # The pool leases its trainers together, so the first to ask already sees its peers.
        self.tracker.set_workers(set(self.parts.trainers.workers()) | self.trainers.keys())

    async def _add_trainer(self, worker: str) -> None:
        self._restripe()
        descriptor = m.ExecutorDescriptor(executor_class="train", name=self.job.trainers.executor)
        try:
            member = await self._dispatch(worker, descriptor, codec.encode_json(self._train_doc()))
        except JobError:
            raise
        except HyphaError as exc:
            self.parts.trainers.lose(worker, f"dispatch failed: {exc}")
            return
        self.trainers[worker] = member
        self.planner.add_trainer(worker, self.job.batch_size, trio.current_time())
        await self._send_plan()
        logger.info("trainer on %s (%d trainers)", worker, len(self.trainers))

    def lose_trainer(self, worker: str, reason: str) -> None:
        member = self.trainers.pop(worker, None)
        if member is None:
            return
        self.planner.remove_trainer(worker, trio.current_time())
        released = self.tracker.release_worker(worker)
        self._restripe()
        logger.warning("trainer %s lost (%s); slices %s back to AVAILABLE", worker, reason, released)
        self.recorder.event(worker, "lost", self.round)

    async def _send_plan(self) -> None:
        if self.ps is None:
            return
        plan = m.RoundPlan(
            job_id=self.job_id,
            round=self.round,
            trainers=sorted(self.trainers),
            min_updates=self.job.trainers.min,
        )
        try:
            await self.parts.node.request(self.ps.worker, plan, m.Ack)
        except HyphaError as exc:
            logger.warning("round plan not delivered to the parameter server: %s", exc)

    # --- handlers ---------------------------------------------------------------------------

    async def _progress(self, peer: str, request: m.ProgressRequest) -> m.Msg:
        if request.job_id != self.job_id:
            raise JobError(f"unknown job {request.job_id}")
        event = request.event
        if isinstance(event, m.Metrics):
            self.recorder.metrics(peer, event.round, event.values)
            return m.Done() if self.done else m.Continue()
        if self.done:
            if isinstance(event, m.UpdateApplied):
                self.recorder.event(peer, "update_applied", event.round)
            return m.Done()
        now = trio.current_time()
        if isinstance(event, m.BatchesDone):
            for index in event.slices_done:
                self._mark_used(peer, index)
            if event.batches == 0:
                return m.Continue()
            self.recorder.batches(peer, event, now)
            # Fixed-H trainers sync on their own after ``batches_per_round``.
            fixed = self.job.fixed_inner_steps is not None
            if fixed or peer not in self.trainers:
                return m.Continue()
            if event.round == self.round + 1:  # it got round r's weights before we heard of them
                self.planner.record_ahead(peer, event.round, event.batches, event.samples, event.seconds)
                return m.Continue()
            if event.round != self.round:
                return m.Continue()
            batches = self.planner.on_batches(peer, event.batches, event.samples, event.seconds, now)
            if batches is not None:
                self.recorder.event(peer, "sync_planned", self.round, batches=batches)
                return m.SyncAfter(round=self.round, batches=batches)
            return m.Continue()
        if isinstance(event, m.UpdateSent):
            self.recorder.event(peer, "update_sent", event.round, samples=event.samples)
            return m.Continue()
        if isinstance(event, m.UpdateApplied):
            self.recorder.event(peer, "update_applied", event.round)
            return m.Done() if event.round + 1 >= self.job.rounds else m.Continue()
        return m.Continue()

    def _mark_used(self, worker: str, index: int) -> None:
        try:
            self.tracker.mark_used(worker, index)
        except HyphaError as exc:
            logger.debug("slice %d from %s not marked used: %s", index, worker, exc)

    async def _next_slice(self, peer: str, request: m.NextSliceRequest) -> m.Msg:
        if request.dataset != self.job.dataset:
            raise DataError(f"this job trains on {self.job.dataset!r}, not {request.dataset!r}")
        if peer not in self.trainers:
            return m.NoSlice(reason="not a trainer of this job")
        # A trainer holds at most its fair share of slices in flight (current + prefetched):
        # one that hoards prefetched slices while it waits at a sync could starve another
        # that still has batches to run for the same round.
        limit = max(1, self.tracker.num_slices // (2 * max(1, len(self.trainers))))
        if len(self.tracker.assigned(peer)) >= limit:
            return m.NoSlice(reason=f"already holds {limit} slices in flight")
        assigned = self.tracker.assign(peer)
        if assigned is None:
            return m.NoSlice(reason="every slice is in use")
        index, epoch = assigned
        upcoming = [
            m.SliceHint(index=i, sha256=self.manifest.slices[i].sha256)
            for i in range(self.tracker.num_slices)
            if self.tracker.owner(i) == peer and self.tracker.state(i) is SliceState.AVAILABLE
        ][:2]
        return m.SliceAssign(
            dataset=self.job.dataset,
            index=index,
            epoch=epoch,
            sha256=self.manifest.slices[index].sha256,
            providers=list(self.providers),
            upcoming=upcoming,
        )

    async def _slice_used(self, peer: str, request: m.SliceUsed) -> m.Ack:
        self._mark_used(peer, request.index)
        return m.Ack()

    async def _slice_returned(self, peer: str, request: m.SliceReturned) -> m.Ack:
        if request.job_id != self.job_id or request.dataset != self.job.dataset:
            raise DataError(f"no slices of {request.dataset!r} in job {request.job_id}")
        # A stale or repeated return is answered with the tracker's LeaseError.
        skipped = self.tracker.give_back(peer, request.index, request.epoch)
        reason = request.reason[:300]
        logger.warning("slice %d given back by %s: %s", request.index, peer, reason)
        if skipped:
            logger.error(
                "slice %d skipped in epoch %d: no trainer could fetch it (last: %s)",
                request.index,
                self.tracker.epoch,
                reason,
            )
        return m.Ack()

    async def _round_closed(self, peer: str, closed: m.RoundClosed) -> m.Ack:
        if self.ps is None or peer != self.ps.worker or closed.job_id != self.job_id:
            raise JobError("only this job's parameter server closes rounds")
        self.recorder.global_round(closed)
        self.finished_rounds = closed.round + 1
        if closed.round + 1 >= self.job.rounds:
            self.done = True
        else:
            self.round = closed.round + 1
            self.planner.start_round(
                self.round,
                self.job.samples_per_round,
                [(w, self.job.batch_size) for w in self.trainers],
                trio.current_time(),
            )
            await self._send_plan()
        self._round_closed_event.set()
        self._round_closed_event = trio.Event()
        return m.Ack()

    async def _final_model(self, peer: str, request: m.TensorPushRequest) -> m.TransferDone:
        offer = request.offer
        if self.ps is None or peer != self.ps.worker or offer.job_id != self.job_id:
            return m.TransferDone(transfer_id=offer.transfer_id, ok=False, detail="not expected")
        await self.bulk.pull(offer, peer, self.recorder.model_path)
        self.model_received.set()
        return m.TransferDone(transfer_id=offer.transfer_id, ok=True)

    # --- the loop -----------------------------------------------------------------------------

    async def _watch(self) -> None:
        """React to pool changes and task statuses while the job runs."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_events)
            nursery.start_soon(self._watch_statuses)

    async def _watch_events(self) -> None:
        async for event in self.parts.events:
            if event.pool == "trainers" and event.kind == "joined":
                await self.add_trainer(event.worker)
            elif event.pool == "trainers":
                self.lose_trainer(event.worker, event.reason)
                await self._send_plan()
            elif event.kind == "lost" and not self.done:
                raise JobError(f"parameter server {event.worker} lost: {event.reason}")

    async def _watch_statuses(self) -> None:
        async for status in self.parts.statuses:
            if self.ps is not None and status.task_id == self.ps.task_id:
                if status.state == "failed" and not self.done:
                    raise JobError(f"parameter server failed: {status.detail or status.exit_code}")
                continue
            member = next((t for t in self.trainers.values() if t.task_id == status.task_id), None)
            if member is None:
                continue
            if status.state == "failed":
                detail = status.detail.strip().splitlines()[-1] if status.detail.strip() else ""
                if status.exit_code is None and ("cannot start" in status.detail or not member.reported):
                    raise JobError(f"trainer executor on {member.worker} cannot start: {detail}")
                self.parts.trainers.lose(
                    member.worker, f"task failed with exit code {status.exit_code}: {detail}"
                )
            elif status.state == "running":
                member.reported = True
            elif status.state == "finished":
                self.recorder.event(member.worker, "finished", self.round)
                self._trainer_finished.set()

    async def run(self) -> None:
        await self.start_parameter_server()
        self.planner.start_round(0, self.job.samples_per_round, [], trio.current_time())
        async with trio.open_nursery() as nursery:
            # Pool members that joined before now are queued as "joined" events too.
            nursery.start_soon(self._watch)
            while not self.done:
                await self._round_closed_event.wait()
                self.recorder.write_status(self)
            await self._finish()
            nursery.cancel_scope.cancel()

    async def _finish(self) -> None:
        assert self.ps is not None
        try:
            await self.parts.node.request(self.ps.worker, m.JobFinished(job_id=self.job_id), m.Ack)
        except HyphaError as exc:
            logger.error("could not ask the parameter server for the final model: %s", exc)
        with trio.move_on_after(60):
            await self.model_received.wait()
        # Trainers learn the job is over from the answer to their last report.
        with trio.move_on_after(30):
            while not self._all_trainers_done():
                await self._trainer_finished.wait()
                self._trainer_finished = trio.Event()
        self.recorder.finish(self)

    def _all_trainers_done(self) -> bool:
        return all(self.recorder.has_finished(w) for w in self.trainers)


async def run_job(parts: SchedulerParts, job: JobSpec) -> None:
    """Run ``job`` to completion; raises ``JobError`` with a clear reason when it cannot."""
    providers, manifest = await discover_dataset(parts, job.dataset, timeout_seconds=60)
    logger.info("dataset %s: %d slices from %d providers", job.dataset, manifest.num_slices, len(providers))
    driver = JobDriver(parts, job, providers, manifest)
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.bulk.run)
        await driver.run()
        nursery.cancel_scope.cancel()
    if driver.recorder.final_loss is not None:
        logger.info("job %s finished: final loss %.4f", job.name, driver.recorder.final_loss)
