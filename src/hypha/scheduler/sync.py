"""Performance-aware DiLoCo sync planning: how many more batches each trainer runs.

Each trainer reports progress in batches. The planner keeps a smoothed seconds-per-batch
estimate per trainer and, on every report, simulates the rest of the round forward
(``simulate``): the trainer whose next batch completes first takes it, until the round's
sample budget is covered. When that projected finish is close (within the horizon, or before
this trainer would report again), the reporting trainer is told its exact number of
remaining batches (``SyncAfter{batches}``), so fast trainers run more inner steps, slow ones
fewer, and all of them reach the outer sync at about the same moment.

This module is pure bookkeeping with times passed in; it sends no messages and reads no
clock. The scheduler's job loop owns the round, the replies and the trainer pool.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TrainerPace:
    """What the simulation knows about one trainer; times are seconds from now."""

    worker: str
    seconds_per_batch: float
    batch_size: int
    next_batch_done_in_seconds: float


@dataclass(frozen=True, slots=True)
class Plan:
    """Outcome of ``simulate``: batches per worker and when the last one completes."""

    batches: dict[str, int]
    finish_seconds: float


def simulate(trainers: Sequence[TrainerPace], samples_remaining: int) -> Plan:
    """Assign the remaining samples batch by batch to whichever trainer finishes first.

    An event-driven forward simulation: repeatedly take the trainer whose next batch
    completes earliest (ties broken by worker id), give it that batch, and advance its next
    completion by its seconds per batch, until ``samples_remaining`` is covered. Trainers
    whose every future batch would complete after the last needed one get 0. An overdue
    batch (negative ``next_batch_done_in_seconds``) is taken to complete now.

    Args:
        trainers: The trainers that can still take batches; worker ids must be unique.
        samples_remaining: Samples still to cover; 0 or less needs no batches.

    Returns:
        Batches per worker (every trainer present, possibly 0) and the finish time in
        seconds from now (0.0 when nothing remains).

    Raises:
        ValueError: Duplicate workers, a non-positive batch size or seconds per batch, or
            samples to cover with no trainers.
    """
    batches: dict[str, int] = {}
    for pace in trainers:
        if pace.worker in batches:
            raise ValueError(f"duplicate trainer {pace.worker!r}")
        if pace.batch_size <= 0:
            raise ValueError(f"trainer {pace.worker!r}: batch_size must be > 0")
        if not math.isfinite(pace.seconds_per_batch) or pace.seconds_per_batch <= 0:
            raise ValueError(f"trainer {pace.worker!r}: seconds_per_batch must be > 0")
        batches[pace.worker] = 0
    if samples_remaining <= 0:
        return Plan(batches=batches, finish_seconds=0.0)
    if not trainers:
        raise ValueError("no trainers to cover the remaining samples")

    events = [
        (max(0.0, pace.next_batch_done_in_seconds), pace.worker, index) for index, pace in enumerate(trainers)
    ]
    heapq.heapify(events)
    remaining = samples_remaining
    finish_seconds = 0.0
    while remaining > 0:
        done_at, worker, index = heapq.heappop(events)
        pace = trainers[index]
        batches[worker] += 1
        remaining -= pace.batch_size
        finish_seconds = done_at
        heapq.heappush(events, (done_at + pace.seconds_per_batch, worker, index))
    return Plan(batches=batches, finish_seconds=finish_seconds)


def _valid_counts(batches: int, samples: int, seconds: float) -> bool:
    return batches >= 0 and samples >= 0 and math.isfinite(seconds) and seconds >= 0


@dataclass(slots=True)
class _Trainer:
    batch_size: int
    seconds_per_batch: float | None = None
    last_report_at: float = 0.0
    samples: int = 0
    committed: int | None = None
    outstanding: int = 0


@dataclass(frozen=True, slots=True)
class SyncStatistics:
    """Snapshot of the current round for telemetry."""

    round: int
    sample_budget: int
    samples_done: int
    samples_outstanding: int
    num_trainers: int
    num_committed: int
    seconds_per_batch: dict[str, float]


class SyncPlanner:
    """Decides per trainer when to sync so that a round's trainers finish together.

    Commits happen one trainer at a time, on that trainer's own report, because the answer
    travels as the reply to its progress message. Each later plan subtracts the batches
    already committed, so the trainers that commit last absorb any estimation error.

    Trainers without an estimate yet (no report with a positive duration) are left out of
    the simulation, which is the pessimistic choice for the finish time: if the trainers
    with estimates alone finish within the horizon, the real finish is no later, so the
    reporting trainer may commit (its count may then be slightly high); otherwise it
    continues until the unknown trainers have reported. Estimates survive across rounds; a
    removed trainer's estimate is dropped. A trainer that is the only one without a sync
    always commits, since no one else is left to cover the rest; and once the budget is
    met every reporting trainer commits to 0.

    Args:
        horizon_seconds: Commit a trainer once the projected finish is this close. Choose it
            at least as long as the trainers' report interval: a trainer that reports less
            often than that may run past the budget before it hears back.
        smoothing: Weight of a new measurement in the seconds-per-batch moving average
            (1.0 keeps only the latest).
    """

    def __init__(self, horizon_seconds: float = 2.0, smoothing: float = 0.5) -> None:
        if not math.isfinite(horizon_seconds) or horizon_seconds < 0:
            raise ValueError(f"horizon_seconds must be finite and >= 0, got {horizon_seconds}")
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        self.horizon_seconds = horizon_seconds
        self.smoothing = smoothing
        self._round = -1
        self._sample_budget = 0
        self._samples_done = 0
        self._trainers: dict[str, _Trainer] = {}
        self._ahead: dict[str, list[tuple[int, int, float]]] = {}
        """Reports of the next round that came before it started: worker -> (batches, samples, seconds)."""

    @property
    def round(self) -> int:
        """The current round (-1 before the first ``start_round``)."""
        return self._round

    @property
    def round_complete(self) -> bool:
        """Whether every trainer of the round has been told when to sync."""
        return bool(self._trainers) and all(
            trainer.committed is not None for trainer in self._trainers.values()
        )

    def committed(self) -> dict[str, int]:
        """Return the batch counts sent so far this round (``SyncAfter.batches``) by worker."""
        return {
            worker: trainer.committed
            for worker, trainer in self._trainers.items()
            if trainer.committed is not None
        }

    def start_round(
        self, round: int, sample_budget: int, trainers: Sequence[tuple[str, int]], now: float
    ) -> None:
        """Begin a round with ``sample_budget`` samples over ``(worker, batch_size)`` pairs.

        Known trainers keep their speed estimates; trainers not listed are forgotten.

        Raises:
            ValueError: A non-positive budget or batch size, or a duplicate worker.
        """
        if sample_budget <= 0:
            raise ValueError(f"sample_budget must be > 0, got {sample_budget}")
        previous = self._trainers
        self._trainers = {}
        for worker, batch_size in trainers:
            if worker in self._trainers:
                raise ValueError(f"duplicate trainer {worker!r}")
            self._add(worker, batch_size, now)
            old = previous.get(worker)
            if old is not None:
                self._trainers[worker].seconds_per_batch = old.seconds_per_batch
        ahead = self._ahead if round == self._round + 1 else {}
        self._ahead = {}
        self._round = round
        self._sample_budget = sample_budget
        self._samples_done = 0
        for worker, reports in ahead.items():
            trainer = self._trainers.get(worker)
            if trainer is None:
                continue  # no longer a trainer: its early batches do not count
            for batches, samples, seconds in reports:
                self._count(trainer, batches, samples, seconds)

    def record_ahead(self, worker: str, round: int, batches: int, samples: int, seconds: float) -> bool:
        """Keep a report of the next round that arrived before this one closed.

        The parameter server sends round ``r``'s weights to every trainer before it tells
        the scheduler that the round closed, so a trainer served early can train and report
        round ``r + 1`` before the scheduler has started it. Its samples and speed count
        when ``start_round(r + 1)`` begins that round (if the worker is still a trainer
        then); the report itself gets no plan, so the trainer is planned on its next
        report, with these samples counted.

        Returns:
            Whether the report was kept (it is for the next round, with valid counts).
        """
        if round != self._round + 1 or not _valid_counts(batches, samples, seconds):
            return False
        self._ahead.setdefault(worker, []).append((batches, samples, seconds))
        return True

    def _count(self, trainer: _Trainer, batches: int, samples: int, seconds: float) -> None:
        """Add a report's samples to the round and its pace to the trainer's estimate."""
        trainer.samples += samples
        self._samples_done += samples
        if batches > 0 and seconds > 0:
            measured = seconds / batches
            if trainer.seconds_per_batch is None:
                trainer.seconds_per_batch = measured
            else:
                trainer.seconds_per_batch += self.smoothing * (measured - trainer.seconds_per_batch)

    def _add(self, worker: str, batch_size: int, now: float) -> None:
        if batch_size <= 0:
            raise ValueError(f"trainer {worker!r}: batch_size must be > 0, got {batch_size}")
        self._trainers[worker] = _Trainer(batch_size=batch_size, last_report_at=now)

    def add_trainer(self, worker: str, batch_size: int, now: float) -> None:
        """Add a trainer mid-round (a replacement); it takes part in later plans.

        Raises:
            ValueError: The worker is already a trainer, or a non-positive batch size.
        """
        if worker in self._trainers:
            raise ValueError(f"trainer {worker!r} already present")
        self._add(worker, batch_size, now)

    def remove_trainer(self, worker: str, now: float) -> None:
        """Forget a lost trainer; its not-yet-run committed batches are re-planned.

        Samples it already reported stay counted (its share of the budget that is still
        open goes to the remaining trainers on their next reports). Unknown workers are
        ignored, so reporting a loss twice is harmless.
        """
        trainer = self._trainers.pop(worker, None)
        if trainer is not None:
            logger.debug(
                "round %d: trainer %s removed at %.3f with %d batches outstanding",
                self._round,
                worker,
                now,
                trainer.outstanding,
            )

    def _remaining_samples(self) -> int:
        outstanding = sum(t.outstanding * t.batch_size for t in self._trainers.values())
        return self._sample_budget - self._samples_done - outstanding

    def on_batches(self, worker: str, batches: int, samples: int, seconds: float, now: float) -> int | None:
        """Record a progress report and decide whether ``worker`` should schedule its sync.

        Args:
            worker: The reporting trainer.
            batches: Batches completed since its previous report.
            samples: Samples in those batches.
            seconds: Time those batches took.
            now: The scheduler's current time.

        Returns:
            The number of further batches to run before syncing (possibly 0), the first
            time the trainer is committed this round; None to continue (not yet decided, or
            already committed).

        Raises:
            ValueError: Unknown worker, no round started, or negative counts.
        """
        trainer = self._trainers.get(worker)
        if trainer is None:
            raise ValueError(f"unknown trainer {worker!r} in round {self._round}")
        if not _valid_counts(batches, samples, seconds):
            raise ValueError("batches, samples and seconds must be >= 0")
        self._count(trainer, batches, samples, seconds)
        trainer.last_report_at = now
        if trainer.committed is not None:
            trainer.outstanding = max(0, trainer.outstanding - batches)
            return None

        count = self._plan_for(worker, trainer, now)
        if count is not None:
            trainer.committed = count
            trainer.outstanding = count
            logger.debug("round %d: trainer %s syncs after %d batches", self._round, worker, count)
        return count

    def _plan_for(self, worker: str, trainer: _Trainer, now: float) -> int | None:
        remaining = self._remaining_samples()
        if remaining <= 0:
            return 0
        open_trainers = {w: t for w, t in self._trainers.items() if t.committed is None}
        if len(open_trainers) == 1:
            # Everyone else knows when to sync: this trainer covers the rest alone.
            return -(-remaining // trainer.batch_size)
        if trainer.seconds_per_batch is None:
            return None
        paces = [
            TrainerPace(
                worker=w,
                seconds_per_batch=t.seconds_per_batch,
                batch_size=t.batch_size,
                next_batch_done_in_seconds=t.last_report_at + t.seconds_per_batch - now,
            )
            for w, t in open_trainers.items()
            if t.seconds_per_batch is not None
        ]
        plan = simulate(paces, remaining)
        if plan.finish_seconds <= self.horizon_seconds:
            return plan.batches[worker]
        return None

    def statistics(self) -> SyncStatistics:
        """Return a snapshot of the round's progress and the speed estimates."""
        return SyncStatistics(
            round=self._round,
            sample_budget=self._sample_budget,
            samples_done=self._samples_done,
            samples_outstanding=sum(t.outstanding * t.batch_size for t in self._trainers.values()),
            num_trainers=len(self._trainers),
            num_committed=sum(1 for t in self._trainers.values() if t.committed is not None),
            seconds_per_batch={
                w: t.seconds_per_batch for w, t in self._trainers.items() if t.seconds_per_batch is not None
            },
        )
