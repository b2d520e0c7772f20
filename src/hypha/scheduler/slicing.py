"""Answering trainers' slice traffic: the next slice, slices used, slices given back.

Owns the RPC side of the job's ``SliceTracker`` (held in ``JobState``): who may ask
(only the job's trainers), the in-flight limit per trainer, the hints of upcoming slices,
and logging of returns and skips. The tracker's rules themselves are ``slices.py``'s.
"""

from __future__ import annotations

import logging

from hypha.data.manifest import Manifest
from hypha.errors import DataError, HyphaError
from hypha.net.iface import Registrar
from hypha.protocol import messages as m
from hypha.scheduler.slices import SliceState, SliceTracker
from hypha.scheduler.state import JobState

logger = logging.getLogger(__name__)


class SliceService:
    """The slice handlers of one job."""

    def __init__(self, state: JobState, manifest: Manifest) -> None:
        assert state.slices is not None
        assert state.dataset is not None
        self.state = state
        self.manifest = manifest
        self.tracker: SliceTracker = state.slices
        self.providers = list(state.dataset.providers)

    def register(self, rpc: Registrar) -> None:
        rpc.register(m.NextSliceRequest, self._next_slice, roles={"worker"})
        rpc.register(m.SliceReturned, self._slice_returned, roles={"worker"})

    def mark_used(self, worker: str, index: int) -> None:
        """A trainer reported slice ``index`` done (stale or foreign reports are ignored)."""
        try:
            self.tracker.mark_used(worker, index)
        except HyphaError as exc:
            logger.debug("slice %d from %s not marked used: %s", index, worker, exc)
            return
        self.state.slices_changed()

    async def _next_slice(self, peer: str, request: m.NextSliceRequest) -> m.Msg:
        spec, tracker = self.state.spec, self.tracker
        if request.dataset != spec.dataset:
            raise DataError(f"this job trains on {spec.dataset!r}, not {request.dataset!r}")
        if peer not in self.state.trainers:
            return m.NoSlice(reason="not a trainer of this job")
        # A trainer holds at most its fair share of slices in flight (current + prefetched):
        # one that hoards prefetched slices while it waits at a sync could starve another
        # that still has batches to run for the same round.
        limit = max(1, tracker.num_slices // (2 * max(1, len(self.state.trainers))))
        if len(tracker.assigned(peer)) >= limit:
            return m.NoSlice(reason=f"already holds {limit} slices in flight")
        assigned = tracker.assign(peer)
        if assigned is None:
            return m.NoSlice(reason="every slice is in use")
        self.state.slices_changed()
        index, epoch = assigned
        upcoming = [
            m.SliceHint(index=i, sha256=self.manifest.slices[i].sha256)
            for i in range(tracker.num_slices)
            if tracker.owner(i) == peer and tracker.state(i) is SliceState.AVAILABLE
        ][:2]
        return m.SliceAssign(
            dataset=spec.dataset,
            index=index,
            epoch=epoch,
            sha256=self.manifest.slices[index].sha256,
            providers=list(self.providers),
            upcoming=upcoming,
        )

    async def _slice_returned(self, peer: str, request: m.SliceReturned) -> m.Ack:
        if request.job_id != self.state.job_id or request.dataset != self.state.spec.dataset:
            raise DataError(f"no slices of {request.dataset!r} in job {request.job_id}")
        # A stale or repeated return is answered with the tracker's LeaseError.
        skipped = self.tracker.give_back(peer, request.index, request.epoch)
        self.state.slices_changed()
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
