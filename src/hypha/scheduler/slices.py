"""Which dataset slice each trainer works on next, epoch by epoch.

A job's dataset is cut into ``num_slices`` slices. Within an epoch each slice moves
AVAILABLE -> ASSIGNED (handed to one worker) -> USED (the worker reported it done); when
no slice is AVAILABLE and some are USED, the next epoch starts with the USED ones AVAILABLE
again. Slices still in flight from the previous epoch count for the epoch they were assigned
in and become AVAILABLE for the current one when they are reported used, so trainers that
prefetch never wait for the slowest one to finish its queue (which could deadlock a round). Slices keep an
owner across epochs so a worker is handed the slices it already has cached; an idle worker
steals from the owner with the most slices left. A lost worker's in-flight slices return
to AVAILABLE and it loses ownership, so no slice is lost (one in flight from an earlier
epoch counts for the current one then). So does a slice its worker gives back because it
could not fetch it (``give_back``): that worker is handed it again this epoch only when
nothing else is left, and once every trainer has given it back it is skipped for the epoch
(counted USED, in ``num_skipped``) rather than stalling it. When the job tells the tracker
its trainers (``set_workers``), each takes fresh slices from its own stripe first (rank
``r`` of ``n`` in peer-id order: indices ``r, r+n, r+2n, ...``), so which trainer trains on
which data does not depend on who asked first, and a run with the same trainers and the
same number of batches each is reproducible.

This module is pure and deterministic; it does not fetch data or know data nodes. The
scheduler's job driver answers ``NextSliceRequest``/``SliceReturned`` and trainers'
``slices_done`` with it; ``JobState`` (``state.py``) holds it and saves it with
``to_dict``/``from_dict``.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hypha.errors import DataError, LeaseError


class SliceState(enum.Enum):
    """Where a slice is within the current epoch."""

    AVAILABLE = "available"
    ASSIGNED = "assigned"
    USED = "used"


@dataclass(frozen=True, slots=True)
class SliceStatistics:
    """Snapshot of slice states for telemetry."""

    epoch: int
    num_slices: int
    num_available: int
    num_assigned: int
    num_used: int
    """Slices used this epoch, the skipped ones included."""
    num_skipped: int
    """Slices skipped this epoch because every trainer gave them back."""
    num_owners: int


class SliceTracker:
    """Hands out slices so that each is used exactly once per epoch.

    A slice that is ASSIGNED always belongs to the worker it was assigned to (assignment
    moves ownership), so ``owner(index)`` is also the holder of an assigned slice.

    Args:
        num_slices: How many slices the dataset has; at least 1.
    """

    def __init__(self, num_slices: int) -> None:
        if num_slices < 1:
            raise ValueError(f"num_slices must be >= 1, got {num_slices}")
        self._states = [SliceState.AVAILABLE] * num_slices
        self._owners: list[str | None] = [None] * num_slices
        self._assigned_in: list[int] = [0] * num_slices
        self._epoch = 0
        self._stripes: dict[str, tuple[int, int]] = {}
        self._failed: dict[int, set[str]] = {}
        """Slice -> workers that gave it back this epoch (they get it only as a last resort)."""
        self._skipped: set[int] = set()
        """Slices every trainer gave back this epoch: USED without being trained."""

    @property
    def num_slices(self) -> int:
        """Number of slices in the dataset."""
        return len(self._states)

    @property
    def epoch(self) -> int:
        """The current epoch, starting at 0."""
        return self._epoch

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self._states):
            raise DataError(f"slice {index} out of range 0..{len(self._states) - 1}")

    def _check_holder(self, worker: str, index: int, epoch: int | None = None) -> None:
        """Raise unless slice ``index`` is ASSIGNED to ``worker`` (for ``epoch``, if given)."""
        self._check_index(index)
        if (
            self._states[index] is not SliceState.ASSIGNED
            or self._owners[index] != worker
            or (epoch is not None and self._assigned_in[index] != epoch)
        ):
            for_epoch = "" if epoch is None else f" for epoch {epoch}"
            raise LeaseError(f"slice {index} is not assigned to {worker}{for_epoch}")

    def state(self, index: int) -> SliceState:
        """Return the state of slice ``index`` in the current epoch.

        Raises:
            DataError: ``index`` is out of range.
        """
        self._check_index(index)
        return self._states[index]

    def owner(self, index: int) -> str | None:
        """Return the worker that owns (has cached) slice ``index``, if any.

        Raises:
            DataError: ``index`` is out of range.
        """
        self._check_index(index)
        return self._owners[index]

    def assigned(self, worker: str) -> list[int]:
        """Return the slices currently ASSIGNED to ``worker``, lowest index first."""
        return [
            index
            for index, (state, owner) in enumerate(zip(self._states, self._owners, strict=True))
            if state is SliceState.ASSIGNED and owner == worker
        ]

    def set_workers(self, workers: Iterable[str]) -> None:
        """Give each of ``workers`` (ranked by id) its stripe of fresh slices."""
        ranked = sorted(set(workers))
        self._stripes = {worker: (rank, len(ranked)) for rank, worker in enumerate(ranked)}

    def _pick(self, worker: str) -> int | None:
        available = [i for i, s in enumerate(self._states) if s is SliceState.AVAILABLE]
        if not available:
            return None
        untried = [i for i in available if worker not in self._failed.get(i, ())]
        available = untried or available
        # Cache affinity first, then a slice nobody has (own stripe first), then steal.
        for index in available:
            if self._owners[index] == worker:
                return index
        if worker in self._stripes:
            rank, size = self._stripes[worker]
            for index in available:
                if self._owners[index] is None and index % size == rank:
                    return index
        for index in available:
            if self._owners[index] is None:
                return index
        counts = Counter(self._owners[i] for i in available)
        # Steal from the owner with the most slices left (ties: lowest worker id), so the
        # load evens out and the victim keeps as much of its cache as possible.
        victim = min(counts, key=lambda owner: (-counts[owner], owner or ""))
        return next(i for i in available if self._owners[i] == victim)

    def assign(self, worker: str) -> tuple[int, int] | None:
        """Hand ``worker`` its next slice and make it the slice's owner.

        Preference: the lowest-index AVAILABLE slice it owns, else the lowest-index
        AVAILABLE unowned slice of its stripe (see ``set_workers``), else the lowest-index
        AVAILABLE unowned slice, else the lowest-index AVAILABLE slice of the owner with the
        most AVAILABLE slices (ties by worker id); slices the worker gave back this epoch
        are considered only when no other is AVAILABLE. When every slice is USED a new epoch
        starts (owners kept) and the choice is made again.

        Args:
            worker: The requesting worker's id.

        Returns:
            ``(index, epoch)``, or None when every slice is ASSIGNED.

        Raises:
            ValueError: ``worker`` is empty.
        """
        if not worker:
            raise ValueError("worker must be non-empty")
        index = self._pick(worker)
        if index is None:
            if not any(state is SliceState.USED for state in self._states):
                return None
            self._epoch += 1
            self._failed.clear()
            self._skipped.clear()
            self._states = [
                SliceState.AVAILABLE if state is SliceState.USED else state for state in self._states
            ]
            index = self._pick(worker)
            assert index is not None  # the USED slices were just made AVAILABLE
        self._states[index] = SliceState.ASSIGNED
        self._owners[index] = worker
        self._assigned_in[index] = self._epoch
        return index, self._epoch

    def mark_used(self, worker: str, index: int) -> None:
        """Record that ``worker`` finished slice ``index``.

        Raises:
            DataError: ``index`` is out of range.
            LeaseError: The slice is not ASSIGNED to ``worker`` (never assigned, already
                used, or taken back when the worker was released).
        """
        self._check_holder(worker, index)
        # Used for the epoch it was assigned in; if that epoch is over, it is still to be
        # used in the current one.
        stale = self._assigned_in[index] < self._epoch
        self._states[index] = SliceState.AVAILABLE if stale else SliceState.USED

    def give_back(self, worker: str, index: int, epoch: int) -> bool:
        """Take back slice ``index``, which ``worker`` could not fetch (assigned for ``epoch``).

        The worker loses ownership (it has not cached the slice). The slice is AVAILABLE
        again, and handed to this worker again this epoch only when no other slice is
        AVAILABLE, so another worker, which may reach the data nodes where this one could
        not, gets it first. Once every trainer (``set_workers``; this worker alone when none
        were set) has given it back this epoch, no one is expected to fetch it: it is skipped
        for the epoch, counted USED, so that the epoch can end; the next epoch tries again.

        Returns:
            Whether the slice is skipped for this epoch.

        Raises:
            DataError: ``index`` is out of range.
            LeaseError: The slice is not ASSIGNED to ``worker`` for ``epoch`` (a stale or
                repeated return).
        """
        self._check_holder(worker, index, epoch)
        self._owners[index] = None
        failed = self._failed.setdefault(index, set())
        failed.add(worker)
        if failed >= set(self._stripes) | {worker}:
            self._states[index] = SliceState.USED
            self._skipped.add(index)
            return True
        self._states[index] = SliceState.AVAILABLE
        return False

    def release_worker(self, worker: str) -> list[int]:
        """Take back a lost worker's slices: ASSIGNED ones become AVAILABLE again.

        The worker also loses ownership of every slice, so others pick them up without
        stealing.

        Returns:
            The indices that went from ASSIGNED back to AVAILABLE.
        """
        returned: list[int] = []
        for index, owner in enumerate(self._owners):
            if owner != worker:
                continue
            if self._states[index] is SliceState.ASSIGNED:
                self._states[index] = SliceState.AVAILABLE
                returned.append(index)
            self._owners[index] = None
        return returned

    def statistics(self) -> SliceStatistics:
        """Return counts of slices per state and the number of distinct owners."""
        counts = Counter(self._states)
        return SliceStatistics(
            epoch=self._epoch,
            num_slices=len(self._states),
            num_available=counts[SliceState.AVAILABLE],
            num_assigned=counts[SliceState.ASSIGNED],
            num_used=counts[SliceState.USED],
            num_skipped=len(self._skipped),
            num_owners=len({owner for owner in self._owners if owner is not None}),
        )

    def to_dict(self) -> dict[str, Any]:
        """Everything the tracker knows, as JSON-ready values (``from_dict`` restores it)."""
        return {
            "states": [state.value for state in self._states],
            "owners": list(self._owners),
            "assigned_in": list(self._assigned_in),
            "epoch": self._epoch,
            "stripes": {worker: list(stripe) for worker, stripe in self._stripes.items()},
            "failed": {str(index): sorted(workers) for index, workers in self._failed.items()},
            "skipped": sorted(self._skipped),
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> SliceTracker:
        """Rebuild a tracker saved by ``to_dict``.

        Raises:
            ValueError: The document is inconsistent (lengths differ, unknown states).
        """
        states = [SliceState(value) for value in doc["states"]]
        tracker = cls(len(states))
        owners = [None if owner is None else str(owner) for owner in doc["owners"]]
        assigned_in = [int(epoch) for epoch in doc["assigned_in"]]
        if not len(owners) == len(assigned_in) == len(states):
            raise ValueError("slice tracker: states, owners and epochs differ in length")
        tracker._states = states
        tracker._owners = owners
        tracker._assigned_in = assigned_in
        tracker._epoch = int(doc["epoch"])
        tracker._stripes = {str(w): (int(r), int(n)) for w, (r, n) in doc["stripes"].items()}
        tracker._failed = {int(i): {str(w) for w in ws} for i, ws in doc["failed"].items()}
        tracker._skipped = {int(i) for i in doc["skipped"]}
        return tracker
