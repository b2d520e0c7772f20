"""The job driver: one DiLoCo training job from first dispatch to the final model.

Owns the job's lifecycle and its RPC handlers: dispatching the parameter server and the
trainers on the pools' leases (and replacements as the pools change), answering trainers'
progress with the sync planner's instructions, assigning slices, telling the parameter
server which updates each round expects, advancing rounds when it reports them closed,
following task statuses, and receiving the final model. Slice requests are answered by
``slicing.py``. Every fact about the job lives in
its ``JobState`` (``state.py``), changed only through its methods; documents are built by
``documents.py``, outputs written by ``results.py``, leases kept by ``pool.py``.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

import trio

from hypha.data.manifest import Manifest
from hypha.errors import ForbiddenError, HyphaError, JobError
from hypha.net.bulk import BulkService
from hypha.net.host import Node
from hypha.protocol import codec
from hypha.protocol import messages as m
from hypha.scheduler import documents
from hypha.scheduler.pool import Pool
from hypha.scheduler.progress import ProgressService
from hypha.scheduler.results import JobRecorder
from hypha.scheduler.slices import SliceTracker
from hypha.scheduler.slicing import SliceService
from hypha.scheduler.state import JobState, LeaseRecord, PoolName, TaskRecord, TaskRole
from hypha.scheduler.statuses import TaskStatusService
from hypha.scheduler.sync import SyncPlanner

logger = logging.getLogger(__name__)

DATASET_WAIT_SECONDS = 60.0
FINAL_MODEL_WAIT_SECONDS = 60.0
TRAINERS_FINISH_WAIT_SECONDS = 30.0


@dataclass
class JobContext:
    """What a job runs on: the scheduler's node and its two pools."""

    node: Node
    trainers: Pool
    parameter_server: Pool


class JobDriver:
    """Runs one job; see the module docstring.

    Args:
        ctx: The node and pools.
        state: The job's state; its dataset must be set.
        manifest: The dataset's manifest (slice hashes), matching ``state.dataset``.
        recorder: Where the job's outputs go (already started).
    """

    def __init__(self, ctx: JobContext, state: JobState, manifest: Manifest, recorder: JobRecorder) -> None:
        assert state.dataset is not None
        assert state.slices is not None
        self.ctx = ctx
        self.state = state
        self.manifest = manifest
        self.recorder = recorder
        self.planner = SyncPlanner(horizon_seconds=state.spec.sync_horizon_seconds)
        self._plan_lock = trio.Lock()
        self.bulk = BulkService(ctx.node)
        self.slices = SliceService(state, manifest)
        self.slices.register(ctx.node.rpc)
        self._error: JobError | None = None
        self._model_received = trio.Event()
        self._adding: set[str] = set()
        self._trainer_finished = trio.Event()
        node = ctx.node
        self.progress = ProgressService(state, self.planner, recorder, self.slices)
        self.progress.register(node.rpc)
        node.rpc.register(m.RoundClosed, self._round_closed, roles={"worker"})
        node.rpc.register(m.ParameterServerReady, self._parameter_server_ready, roles={"worker"})
        node.rpc.register(m.TensorPushRequest, self._final_model, roles={"worker"})
        self.statuses = TaskStatusService(
            state, ctx.trainers, recorder, self._fail, lambda: self._trainer_finished.set()
        )
        self.statuses.register(node.rpc)
        node.rpc.register(m.JobMemberRequest, self._job_member, roles={"worker"})

    @property
    def job_id(self) -> str:
        return self.state.job_id

    @property
    def tracker(self) -> SliceTracker:
        return self.slices.tracker

    def _fail(self, error: JobError) -> None:
        """Fail the job (the first failure wins); ``run`` raises it."""
        if self._error is None:
            self._error = error
            self.state.fail(str(error))

    # --- dispatch ---------------------------------------------------------------------------

    def _pool(self, executor_class: m.ExecutorClass) -> Pool:
        return self.ctx.parameter_server if executor_class == "aggregate" else self.ctx.trainers

    async def _dispatch(self, worker: str, executor: m.ExecutorDescriptor, config: bytes) -> TaskRecord:
        grant = self._pool(executor.executor_class).members.get(worker)
        if grant is None:
            raise JobError(f"{worker} is no longer leased")
        task_id = uuid.uuid4().hex
        request = m.DispatchTask(
            lease_id=grant.lease_id, task_id=task_id, job_id=self.job_id, executor=executor, config=config
        )
        reply = await self.ctx.node.request(worker, request, m.Msg)
        if isinstance(reply, m.Refused):
            raise JobError(f"{executor.executor_class} executor on {worker} cannot start: {reply.reason}")
        codec.expect(reply, m.Dispatched)
        role: TaskRole = "parameter_server" if executor.executor_class == "aggregate" else "trainer"
        return TaskRecord(role=role, worker=worker, task_id=task_id, lease_id=grant.lease_id)

    async def start_parameter_server(self) -> None:
        spec = self.state.spec
        wait = spec.parameter_server.grace_seconds + 60
        with trio.move_on_after(wait):
            await self.ctx.parameter_server.wait_size(1)
        if not self.ctx.parameter_server.members:
            raise JobError(f"no worker took the parameter server within {wait:g} s")
        worker = self.ctx.parameter_server.workers()[0]
        assert self.state.dataset is not None
        doc = documents.aggregate_task(
            spec, self.job_id, self.ctx.node.peer_id, self.state.dataset, self.manifest
        )
        descriptor = m.ExecutorDescriptor(executor_class="aggregate", name=spec.parameter_server.executor)
        self.state.task_dispatched(await self._dispatch(worker, descriptor, codec.encode_json(doc)))
        logger.info("parameter server on %s", worker)

    async def add_trainer(self, worker: str) -> None:
        if worker in self.state.trainers or worker in self._adding or self.state.done:
            return
        self._adding.add(worker)
        try:
            await self._add_trainer(worker)
        finally:
            self._adding.discard(worker)

    def _restripe(self) -> None:
        """Stripe fresh slices over every leased trainer, dispatched or not."""
        # The pool leases its trainers together, so the first to ask already sees its peers.
        self.tracker.set_workers(set(self.ctx.trainers.workers()) | self.state.trainers.keys())

    async def _add_trainer(self, worker: str) -> None:
        self._restripe()
        spec = self.state.spec
        assert self.state.parameter_server is not None
        doc = documents.train_task(spec, self.job_id, self.state.parameter_server.worker)
        descriptor = m.ExecutorDescriptor(executor_class="train", name=spec.trainers.executor)
        try:
            task = await self._dispatch(worker, descriptor, codec.encode_json(doc))
        except JobError:
            raise
        except HyphaError as exc:
            self.ctx.trainers.lose(worker, f"dispatch failed: {exc}")
            return
        self.state.task_dispatched(task)
        self.planner.add_trainer(worker, spec.batch_size, trio.current_time())
        await self._send_plan()
        logger.info("trainer on %s (%d trainers)", worker, len(self.state.trainers))

    async def lose_trainer(self, worker: str, reason: str) -> None:
        if worker not in self.state.trainers:
            return
        self.planner.remove_trainer(worker, trio.current_time())
        released = self.state.trainer_lost(worker)
        self._restripe()
        logger.warning("trainer %s lost (%s); slices %s back to AVAILABLE", worker, reason, released)
        await self.recorder.event(worker, "lost", self.state.round, reason=reason)

    async def _send_plan(self) -> None:
        # One plan at a time, built under the lock: plans reach the parameter server in the
        # order of the state they describe, so an older membership never overwrites a newer.
        async with self._plan_lock:
            ps = self.state.parameter_server
            if ps is None:
                return
            plan = m.RoundPlan(
                job_id=self.job_id,
                round=self.state.round,
                trainers=sorted(self.state.trainers),
                min_updates=self.state.spec.trainers.min,
                max_samples=documents.max_samples_per_update(self.state.spec),
            )
            try:
                await self.ctx.node.request(ps.worker, plan, m.Ack)
            except HyphaError as exc:
                logger.warning("round plan not delivered to the parameter server: %s", exc)

    # --- following the pools ----------------------------------------------------------------

    def _sync_leases(self) -> None:
        """Copy both pools' leases into the state, expiries in wall-clock time."""
        now, wall = trio.current_time(), time.time()
        held: dict[str, LeaseRecord] = {}
        pools: tuple[tuple[PoolName, Pool], ...] = (
            ("trainers", self.ctx.trainers),
            ("parameter_server", self.ctx.parameter_server),
        )
        for name, pool in pools:
            for grant in pool.members.values():
                record = LeaseRecord(name, grant.worker, grant.lease_id, wall + grant.expires_at - now)
                held[grant.lease_id] = record
        for lease_id in set(self.state.leases) - set(held):
            self.state.lease_ended(lease_id)
        for lease_id, record in held.items():
            if self.state.leases.get(lease_id) != record:
                self.state.lease_held(record)

    async def _reconcile(self) -> None:
        """Make the job's tasks agree with the pools' members (level-triggered: no event is missed)."""
        self._sync_leases()
        ps_pool, trainers = self.ctx.parameter_server, self.ctx.trainers
        ps = self.state.parameter_server
        if ps is not None and not self.state.done:
            grant = ps_pool.members.get(ps.worker)
            if grant is None or grant.lease_id != ps.lease_id:
                await self._replace_parameter_server(
                    ps, ps_pool.loss_reason(ps.lease_id) or "its lease ended"
                )
                return
        for worker, task in list(self.state.trainers.items()):
            grant = trainers.members.get(worker)
            if grant is None or grant.lease_id != task.lease_id:
                await self.lose_trainer(worker, trainers.loss_reason(task.lease_id) or "its lease ended")
                await self._send_plan()
        for worker in list(trainers.members):
            if worker not in self.state.trainers:
                await self.add_trainer(worker)

    async def _replace_parameter_server(self, lost: TaskRecord, reason: str) -> None:
        """Fail over: a new parameter server resumes from the job's newest checkpoint.

        Its pool leases a replacement (failing the job past its grace); the trainers are let
        go and leased again, so each restarts against the new server with its weights. The
        rounds since that checkpoint are redone; updates sent to the lost server are gone.
        """
        if not self.state.spec.checkpoint.store:
            self._fail(
                JobError(
                    f"parameter server {lost.worker} lost: {reason} (no [checkpoint] store to resume from)"
                )
            )
            return
        logger.warning("parameter server %s lost (%s): failing over to a new one", lost.worker, reason)
        await self.recorder.event(lost.worker, "parameter_server_lost", self.state.round, reason=reason)
        self.state.parameter_server_lost()
        self.statuses.failures.forgive()  # trainers that died with their server are not crash-looping
        for worker in list(self.state.trainers):
            self.ctx.trainers.lose(worker, "the parameter server was replaced")
        await self.start_parameter_server()

    async def _follow_pools(self) -> None:
        seen = (-1, -1)
        while self._error is None:
            current = (self.ctx.trainers.version, self.ctx.parameter_server.version)
            if current == seen:
                async with trio.open_nursery() as waiters:
                    for pool, version in ((self.ctx.trainers, seen[0]), (self.ctx.parameter_server, seen[1])):
                        waiters.start_soon(_wait_then_cancel, pool, version, waiters.cancel_scope)
                continue
            seen = current
            await self._reconcile()

    # --- handlers ---------------------------------------------------------------------------

    def _is_member(self, peer: str) -> bool:
        ps = self.state.parameter_server
        return peer in self.state.trainers or (ps is not None and peer == ps.worker)

    async def _job_member(self, peer: str, request: m.JobMemberRequest) -> m.JobMemberResponse:
        # Only the job's own workers may learn who else is in it.
        if request.job_id != self.job_id or not self._is_member(peer):
            raise ForbiddenError(f"{peer} holds no task in job {request.job_id}")
        return m.JobMemberResponse(member=self._is_member(request.peer))

    async def _parameter_server_ready(self, peer: str, ready: m.ParameterServerReady) -> m.Ack:
        ps = self.state.parameter_server
        if ps is None or peer != ps.worker or ready.job_id != self.job_id:
            raise JobError("only this job's parameter server reports itself ready")
        if ready.round != self.state.round:
            logger.warning(
                "parameter server %s resumed at round %d: the job goes on from there", peer, ready.round
            )
            self.state.resumed_at(ready.round)
            self._start_planning()
            await self._send_plan()
        return m.Ack()

    def _start_planning(self) -> None:
        spec = self.state.spec
        self.planner.start_round(
            self.state.round,
            spec.samples_per_round,
            [(w, spec.batch_size) for w in self.state.trainers],
            trio.current_time(),
        )

    async def _round_closed(self, peer: str, closed: m.RoundClosed) -> m.Ack:
        ps = self.state.parameter_server
        if ps is None or peer != ps.worker or closed.job_id != self.job_id:
            raise JobError("only this job's parameter server closes rounds")
        await self.recorder.global_round(closed)
        if closed.checkpoint and closed.checkpoint != self.state.checkpoint:
            self.state.checkpoint_written(closed.checkpoint)
        self.state.round_closed(closed.round, self.planner.statistics().seconds_per_batch)
        if not self.state.done:
            self._start_planning()
            await self._send_plan()
        return m.Ack()

    async def _final_model(self, peer: str, request: m.TensorPushRequest) -> m.TransferDone:
        offer = request.offer
        ps = self.state.parameter_server
        if ps is None or peer != ps.worker or offer.job_id != self.job_id:
            return m.TransferDone(transfer_id=offer.transfer_id, ok=False, detail="not expected")
        await self.bulk.pull(offer, peer, self.recorder.model_path)
        self._model_received.set()
        return m.TransferDone(transfer_id=offer.transfer_id, ok=True)

    # --- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Run the job to its end; raises ``JobError`` when it fails."""
        await self.start_parameter_server()
        self.planner.start_round(self.state.round, self.state.spec.samples_per_round, [], trio.current_time())
        async with trio.open_nursery() as nursery:
            # Trainers leased before now are dispatched by the first reconcile.
            nursery.start_soon(self._follow_pools)
            finished = self.state.finished_rounds
            while not self.state.done and self._error is None:
                await self.state.wait_changed(self.state.version)
                if self.state.finished_rounds != finished:
                    finished = self.state.finished_rounds
                    await self.recorder.write_status(self.state.snapshot())
            if self._error is not None:
                await self.recorder.write_status(self.state.snapshot())
                raise self._error
            await self._finish()
            nursery.cancel_scope.cancel()

    async def _finish(self) -> None:
        ps = self.state.parameter_server
        assert ps is not None
        try:
            await self.ctx.node.request(ps.worker, m.JobFinished(job_id=self.job_id), m.Ack)
        except HyphaError as exc:
            logger.error("could not ask the parameter server for the final model: %s", exc)
        with trio.move_on_after(FINAL_MODEL_WAIT_SECONDS):
            await self._model_received.wait()
        # Trainers learn the job is over from the answer to their last report.
        with trio.move_on_after(TRAINERS_FINISH_WAIT_SECONDS):
            while not all(self.recorder.has_finished(w) for w in self.state.trainers):
                await self._trainer_finished.wait()
                self._trainer_finished = trio.Event()
        await self.recorder.finish(self.state.snapshot())


async def _wait_then_cancel(pool: Pool, version: int, scope: trio.CancelScope) -> None:
    await pool.wait_changed(version)
    scope.cancel()
