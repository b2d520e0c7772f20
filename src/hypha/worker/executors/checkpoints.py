"""The parameter server's checkpoints: when to take one, the snapshot, the background write, resume.

Owns one job's ``hypha.checkpoint`` store on the parameter server's side. A checkpoint is due
after every ``every_rounds`` closed rounds and after the last. Taking one pauses the server
only for an in-memory copy (``OuterMaths.snapshot``, under ``TORCH``); encoding and writing
run in a background task while rounds go on, at most one at a time, so checkpoints commit in
round order. A failed write is logged and counted, and the job goes on: the previous
checkpoint stays the one to resume from. ``restore`` loads the newest checkpoint of this job
(a partial or corrupt one is skipped by the store) when a server starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from hypha.checkpoint import CheckpointStore, StoreOptions, open_store
from hypha.errors import HyphaError
from hypha.protocol.tasks import CheckpointDoc
from hypha.worker.executors.aggregate_maths import TORCH, OuterMaths

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

WRITES = trio.CapacityLimiter(1)
"""Checkpoint encodes and writes of this worker's parameter servers, one at a time."""


@dataclass(frozen=True, slots=True)
class CheckpointStatistics:
    """A snapshot of a ``Checkpointer``'s counters (for telemetry and the benchmark)."""

    num_written: int
    num_failed: int
    last: str
    """The newest committed checkpoint's name ("" while none is)."""
    last_round: int | None
    pause_seconds: float
    """Total time rounds waited for snapshots."""
    write_seconds: float
    """Total time of background encodes and writes."""
    bytes_written: int
    resumed_round: int | None
    """The round this server resumed at from a checkpoint (None: it started fresh)."""


class Checkpointer:
    """Checkpoints of one job's parameter server.

    Args:
        doc: the job's checkpoint settings.
        job_id: the job (a checkpoint of another job in the same store is never resumed).
        rounds: the job's number of rounds (the last closed round is always checkpointed).
    """

    def __init__(self, doc: CheckpointDoc, job_id: str, rounds: int) -> None:
        self._doc = doc
        self._job_id = job_id
        self._rounds = rounds
        self._store: CheckpointStore | None = None
        self._idle = trio.Event()
        self._idle.set()
        self._num_written = self._num_failed = self._bytes = 0
        self._pause = self._write = 0.0
        self._last = ""
        self._last_round: int | None = None
        self._resumed: int | None = None

    def statistics(self) -> CheckpointStatistics:
        """Return a snapshot of the counters."""
        return CheckpointStatistics(
            num_written=self._num_written,
            num_failed=self._num_failed,
            last=self._last,
            last_round=self._last_round,
            pause_seconds=self._pause,
            write_seconds=self._write,
            bytes_written=self._bytes,
            resumed_round=self._resumed,
        )

    @property
    def last(self) -> str:
        """The newest committed checkpoint's name ("" while none is)."""
        return self._last

    async def open(self) -> None:
        """Open the store (in a thread: S3 may be dialled).

        Raises:
            CheckpointError: The store cannot be opened.
        """
        doc = self._doc
        options = StoreOptions(
            keep_last_n=doc.keep_last_n,
            compress=doc.compress,
            endpoint_url=doc.endpoint_url,
            region=doc.region,
        )
        self._store = await trio.to_thread.run_sync(open_store, doc.store, options)

    async def restore(self, maths: OuterMaths) -> int | None:
        """Load this job's newest checkpoint into ``maths``; return its round (None: none)."""
        assert self._store is not None
        found = await trio.to_thread.run_sync(self._store.latest)
        if found is None:
            return None
        info, data, metadata = found
        if metadata.get("job_id") != self._job_id:
            logger.info(
                "checkpoint %s is of job %s, not this one: starting fresh", info.name, metadata.get("job_id")
            )
            return None
        try:
            round_ = await trio.to_thread.run_sync(maths.restore, data, limiter=TORCH)
        except ValueError as exc:
            logger.warning("checkpoint %s cannot be restored (%s): starting fresh", info.name, exc)
            return None
        self._last, self._last_round, self._resumed = info.name, info.round, round_
        logger.info("resumed from checkpoint %s at round %d", info.name, round_)
        return round_

    def due(self, round_: int) -> bool:
        """Whether a checkpoint is due once ``round_`` is the round being collected."""
        return round_ % self._doc.every_rounds == 0 or round_ >= self._rounds

    async def take(self, maths: OuterMaths, round_: int, nursery: trio.Nursery) -> None:
        """Snapshot ``maths`` at ``round_`` and write it in the background (one write at a time)."""
        await self._idle.wait()  # the previous write commits first: checkpoints stay in order
        start = trio.current_time()
        snapshot = await trio.to_thread.run_sync(maths.snapshot, limiter=TORCH)
        self._pause += trio.current_time() - start
        self._idle = trio.Event()
        nursery.start_soon(self._write_in_background, snapshot, round_)

    async def drain(self) -> None:
        """Wait until no write is in flight."""
        await self._idle.wait()

    async def _write_in_background(self, snapshot: dict[str, torch.Tensor], round_: int) -> None:
        assert self._store is not None
        store, idle = self._store, self._idle
        start = trio.current_time()
        try:
            data = await trio.to_thread.run_sync(
                OuterMaths.checkpoint_bytes, snapshot, round_, self._job_id, limiter=WRITES
            )
            del snapshot
            info = await trio.to_thread.run_sync(
                store.write, round_, data, {"job_id": self._job_id}, limiter=WRITES
            )
        except HyphaError as exc:
            self._num_failed += 1
            logger.warning("checkpoint of round %d not written (the previous one stands): %s", round_, exc)
        else:
            self._num_written += 1
            self._bytes += info.compressed_size
            self._last, self._last_round = info.name, info.round
            logger.info("checkpoint %s written (round %d, %d bytes)", info.name, round_, info.compressed_size)
        finally:
            self._write += trio.current_time() - start
            idle.set()
