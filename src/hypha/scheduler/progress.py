"""Answering trainers' progress: batches done, updates sent and applied, metrics, sync plans.

Owns the ``ProgressRequest`` handler of one job: progress of peers that are not the job's
trainers is ignored; batches feed the slice tracker (slices used), the recorder and the sync
planner, which may answer ``SyncAfter``; updates applied and metrics go to the recorder; once
the job is done every trainer is told ``Done``.
"""

from __future__ import annotations

import logging

import trio

from hypha.errors import JobError
from hypha.net.iface import Registrar
from hypha.protocol import messages as m
from hypha.scheduler.results import JobRecorder
from hypha.scheduler.slicing import SliceService
from hypha.scheduler.state import JobState
from hypha.scheduler.sync import SyncPlanner

logger = logging.getLogger(__name__)


class ProgressService:
    """The progress handler of one job."""

    def __init__(
        self, state: JobState, planner: SyncPlanner, recorder: JobRecorder, slices: SliceService
    ) -> None:
        self.state = state
        self.planner = planner
        self.recorder = recorder
        self.slices = slices

    def register(self, rpc: Registrar) -> None:
        rpc.register(m.ProgressRequest, self._progress, roles={"worker"})

    async def _progress(self, peer: str, request: m.ProgressRequest) -> m.Msg:
        if request.job_id != self.state.job_id:
            raise JobError(f"unknown job {request.job_id}")
        if peer not in self.state.trainers:  # a lost trainer's last words, or a stranger's
            logger.debug("progress from %s, not a trainer of this job, ignored", peer)
            return m.Continue()
        state, event = self.state, request.event
        if isinstance(event, m.Metrics):
            await self.recorder.metrics(peer, event.round, event.values)
            return m.Done() if state.done else m.Continue()
        if state.done:
            if isinstance(event, m.UpdateApplied):
                await self.recorder.event(peer, "update_applied", event.round)
            return m.Done()
        if isinstance(event, m.BatchesDone):
            return await self._batches(peer, event)
        if isinstance(event, m.UpdateSent):
            await self.recorder.event(peer, "update_sent", event.round, samples=event.samples)
            return m.Continue()
        if isinstance(event, m.UpdateApplied):
            await self.recorder.event(peer, "update_applied", event.round)
            return m.Done() if event.round + 1 >= state.spec.rounds else m.Continue()
        return m.Continue()

    async def _batches(self, peer: str, event: m.BatchesDone) -> m.Msg:
        now = trio.current_time()
        for index in event.slices_done:
            self.slices.mark_used(peer, index)
        if event.batches == 0:
            return m.Continue()
        self.recorder.batches(peer, event, now)
        # Fixed-H trainers sync on their own after ``batches_per_round``.
        if self.state.spec.fixed_inner_steps is not None or peer not in self.state.trainers:
            return m.Continue()
        round_ = self.state.round
        if event.round == round_ + 1:  # it got round r's weights before we heard of them
            self.planner.record_ahead(peer, event.round, event.batches, event.samples, event.seconds)
            return m.Continue()
        if event.round != round_:
            return m.Continue()
        batches = self.planner.on_batches(peer, event.batches, event.samples, event.seconds, now)
        if batches is None:
            return m.Continue()
        await self.recorder.event(peer, "sync_planned", round_, batches=batches)
        return m.SyncAfter(round=round_, batches=batches)
