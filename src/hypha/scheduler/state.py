"""The one state of a scheduler's job: everything needed to describe, persist and resume it.

``JobState`` holds the stable job id, the spec, the dataset it trains on, the leases of both
pools (expiries in wall-clock seconds, so they mean something after a restart), the tasks
dispatched on them, the slice tracker (slice states per epoch), the round, the planner's
inputs (each trainer's measured pace) and the latest checkpoint reference. The job driver
changes it only through its methods; each change bumps ``version`` and wakes
``wait_changed`` so a writer (persistence, ``status.json``) can follow it. ``to_dict`` and
``from_dict`` round-trip it exactly. It does no I/O and knows nothing of the network.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import trio

from hypha.config.job import JobSpec, job_from_dict, job_to_dict
from hypha.scheduler.slices import SliceTracker

STATE_VERSION = 1
"""Format of ``JobState.to_dict``; bumped when a saved state can no longer be read."""

PoolName = Literal["trainers", "parameter_server"]
TaskRole = Literal["trainer", "parameter_server"]


@dataclass(frozen=True)
class DatasetRef:
    """The dataset a job trains on, as found in the network."""

    name: str
    num_slices: int
    manifest_sha256: str
    providers: tuple[str, ...]
    eval_index: int | None
    """The held-out slice the parameter server evaluates on (the last one), if any."""

    @property
    def num_train_slices(self) -> int:
        return self.num_slices - 1 if self.eval_index is not None else self.num_slices


@dataclass(frozen=True)
class LeaseRecord:
    """A lease the scheduler holds on one worker, for one pool."""

    pool: PoolName
    worker: str
    lease_id: str
    expires_at_unix: float
    """Wall-clock expiry (``time.time()`` seconds) as of the last renewal."""


@dataclass
class TaskRecord:
    """A task dispatched on a lease."""

    role: TaskRole
    worker: str
    task_id: str
    lease_id: str
    reported: bool = False
    """The worker reported the task running (it started)."""


@dataclass(frozen=True)
class JobSnapshot:
    """A frozen view of a job for its recorder, ``status.json`` and telemetry."""

    job_id: str
    name: str
    round: int
    finished_rounds: int
    rounds: int
    done: bool
    error: str | None
    trainers: tuple[str, ...]
    parameter_server: str | None
    num_leases: int
    epoch: int
    num_skipped_slices: int
    checkpoint: str | None


@dataclass
class JobState:
    """Everything a scheduler knows of its job; see the module docstring.

    Create one with ``JobState.create``; restore a saved one with ``JobState.from_dict``.
    """

    job_id: str
    spec: JobSpec
    dataset: DatasetRef | None = None
    slices: SliceTracker | None = None
    leases: dict[str, LeaseRecord] = field(default_factory=dict)
    """By lease id."""
    trainers: dict[str, TaskRecord] = field(default_factory=dict)
    """By worker."""
    parameter_server: TaskRecord | None = None
    round: int = 0
    finished_rounds: int = 0
    done: bool = False
    error: str | None = None
    paces: dict[str, float] = field(default_factory=dict)
    """Seconds per batch measured for each trainer (the sync planner's inputs)."""
    checkpoint: str | None = None
    version: int = 0
    _changed: trio.Event | None = field(default=None, repr=False, compare=False)

    @classmethod
    def create(cls, spec: JobSpec) -> JobState:
        """A new job: its id is the job's name plus a random suffix, kept for its lifetime."""
        return cls(job_id=f"{spec.name}-{uuid.uuid4().hex[:8]}", spec=spec)

    # --- changes -------------------------------------------------------------------------

    def _bump(self) -> None:
        self.version += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_changed(self, version: int) -> None:
        """Wait until ``version`` is older than the state's (returns at once if it is)."""
        while self.version <= version:
            if self._changed is None:
                self._changed = trio.Event()
            await self._changed.wait()

    def set_dataset(self, dataset: DatasetRef) -> None:
        """Record the dataset found in the network; the first time, its slices start AVAILABLE."""
        if self.dataset is not None and self.dataset.manifest_sha256 != dataset.manifest_sha256:
            raise ValueError(f"dataset {dataset.name!r} changed since the job started")
        self.dataset = dataset
        if self.slices is None:
            self.slices = SliceTracker(dataset.num_train_slices)
        self._bump()

    def lease_held(self, record: LeaseRecord) -> None:
        """A lease was granted or renewed."""
        self.leases[record.lease_id] = record
        self._bump()

    def lease_ended(self, lease_id: str) -> None:
        if self.leases.pop(lease_id, None) is not None:
            self._bump()

    def task_dispatched(self, task: TaskRecord) -> None:
        if task.role == "parameter_server":
            self.parameter_server = task
        else:
            self.trainers[task.worker] = task
        self._bump()

    def task_reported(self, task: TaskRecord) -> None:
        if not task.reported:
            task.reported = True
            self._bump()

    def trainer_lost(self, worker: str) -> list[int]:
        """Forget a trainer; its in-flight slices go back to AVAILABLE (returned)."""
        if self.trainers.pop(worker, None) is None:
            return []
        self.paces.pop(worker, None)
        released = self.slices.release_worker(worker) if self.slices is not None else []
        self._bump()
        return released

    def restarted(self) -> list[int]:
        """This state was saved by a scheduler that is gone: its tasks and leases went with it.

        Its trainers' in-flight slices go back to AVAILABLE (USED ones stay used, so no slice
        is trained twice in an epoch); the job goes on from its round with new tasks.
        """
        released: list[int] = []
        for worker in list(self.trainers):
            released += self.trainer_lost(worker)
        self.parameter_server = None
        self.leases.clear()
        self._bump()
        return released

    def parameter_server_lost(self) -> None:
        """The parameter server is gone; a replacement is being found."""
        if self.parameter_server is not None:
            self.parameter_server = None
            self._bump()

    def resumed_at(self, round_: int) -> None:
        """A replacement parameter server resumed from a checkpoint: rounds from ``round_`` are redone."""
        if round_ != self.round:
            self.round = round_
            self.finished_rounds = round_
            self.done = False
            self._bump()

    def round_closed(self, round_: int, paces: Mapping[str, float]) -> None:
        """Round ``round_`` closed: the next one starts, or the job is done after the last."""
        self.finished_rounds = round_ + 1
        self.paces = {w: p for w, p in paces.items() if w in self.trainers and math.isfinite(p)}
        if self.finished_rounds >= self.spec.rounds:
            self.done = True
        else:
            self.round = round_ + 1
        self._bump()

    def slices_changed(self) -> None:
        """The tracker was changed in place (assign, used, given back)."""
        self._bump()

    def checkpoint_written(self, ref: str) -> None:
        self.checkpoint = ref
        self._bump()

    def fail(self, error: str) -> None:
        if self.error is None:
            self.error = error
            self._bump()

    # --- views ---------------------------------------------------------------------------

    def leased_workers(self, pool: PoolName) -> list[str]:
        return sorted({r.worker for r in self.leases.values() if r.pool == pool})

    def snapshot(self) -> JobSnapshot:
        stats = self.slices.statistics() if self.slices is not None else None
        return JobSnapshot(
            job_id=self.job_id,
            name=self.spec.name,
            round=self.round,
            finished_rounds=self.finished_rounds,
            rounds=self.spec.rounds,
            done=self.done,
            error=self.error,
            trainers=tuple(sorted(self.trainers)),
            parameter_server=self.parameter_server.worker if self.parameter_server else None,
            num_leases=len(self.leases),
            epoch=stats.epoch if stats else 0,
            num_skipped_slices=stats.num_skipped if stats else 0,
            checkpoint=self.checkpoint,
        )

    # --- persistence ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values; ``from_dict(to_dict())`` gives an equal state."""
        return {
            "format": STATE_VERSION,
            "job_id": self.job_id,
            "spec": job_to_dict(self.spec),
            "dataset": None
            if self.dataset is None
            else {**asdict(self.dataset), "providers": list(self.dataset.providers)},
            "slices": None if self.slices is None else self.slices.to_dict(),
            "leases": [asdict(r) for r in self.leases.values()],
            "trainers": [asdict(t) for t in self.trainers.values()],
            "parameter_server": None if self.parameter_server is None else asdict(self.parameter_server),
            "round": self.round,
            "finished_rounds": self.finished_rounds,
            "done": self.done,
            "error": self.error,
            "paces": dict(self.paces),
            "checkpoint": self.checkpoint,
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> JobState:
        """Restore a state saved by ``to_dict``.

        Raises:
            ValueError: A state of another format, or an inconsistent one.
            ConfigError: The saved spec is no longer a valid job.
        """
        if doc.get("format") != STATE_VERSION:
            raise ValueError(f"job state format {doc.get('format')!r}, expected {STATE_VERSION}")
        dataset = doc["dataset"]
        slices = doc["slices"]
        ps = doc["parameter_server"]
        return cls(
            job_id=str(doc["job_id"]),
            spec=job_from_dict(dict(doc["spec"])),
            dataset=None
            if dataset is None
            else DatasetRef(**{**dataset, "providers": tuple(dataset["providers"])}),
            slices=None if slices is None else SliceTracker.from_dict(slices),
            leases={r["lease_id"]: LeaseRecord(**r) for r in doc["leases"]},
            trainers={t["worker"]: TaskRecord(**t) for t in doc["trainers"]},
            parameter_server=None if ps is None else TaskRecord(**ps),
            round=int(doc["round"]),
            finished_rounds=int(doc["finished_rounds"]),
            done=bool(doc["done"]),
            error=doc["error"],
            paces={str(w): float(p) for w, p in doc["paces"].items()},
            checkpoint=doc["checkpoint"],
            version=int(doc["version"]),
        )


def _dataset_dict(dataset: DatasetRef) -> dict[str, Any]:
    return {**asdict(dataset), "providers": list(dataset.providers)}
