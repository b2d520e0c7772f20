"""Slice tracker: affinity, stealing, epochs and lost workers."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hypha.errors import DataError, LeaseError
from hypha.scheduler.slices import SliceState, SliceTracker


def test_assigns_lowest_unowned_first() -> None:
    tracker = SliceTracker(3)
    assert tracker.assign("a") == (0, 0)
    assert tracker.assign("b") == (1, 0)
    assert tracker.assign("a") == (2, 0)
    assert tracker.assign("c") is None
    assert tracker.state(0) is SliceState.ASSIGNED
    assert tracker.owner(1) == "b"
    assert tracker.assigned("a") == [0, 2]


@pytest.mark.parametrize("order", ["abcabc", "ccbbaa", "aaabbbccc"])
def test_stripes_make_assignment_independent_of_request_order(order: str) -> None:
    tracker = SliceTracker(9)
    tracker.set_workers(["c", "a", "b"])
    got: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    for worker in order:
        assigned = tracker.assign(worker)
        assert assigned is not None
        got[worker].append(assigned[0])
    stripes = {"a": [0, 3, 6], "b": [1, 4, 7], "c": [2, 5, 8]}
    assert got == {w: stripes[w][: len(got[w])] for w in got}


def test_exhausted_stripe_falls_back_to_other_unowned_slices() -> None:
    tracker = SliceTracker(4)
    tracker.set_workers(["a", "b"])
    assert [tracker.assign("a") for _ in range(3)] == [(0, 0), (2, 0), (1, 0)]
    assert tracker.assign("b") == (3, 0)


def test_new_epoch_keeps_owners_for_cache_affinity() -> None:
    tracker = SliceTracker(4)
    for worker in ("a", "b", "a", "b"):
        got = tracker.assign(worker)
        assert got is not None
        tracker.mark_used(worker, got[0])
    assert [tracker.owner(i) for i in range(4)] == ["a", "b", "a", "b"]
    # All used: the next request starts epoch 1, and b gets its own slice back.
    assert tracker.assign("b") == (1, 1)
    assert tracker.assign("b") == (3, 1)
    assert tracker.assign("a") == (0, 1)
    assert tracker.epoch == 1


def test_next_epoch_does_not_wait_for_slices_in_flight() -> None:
    tracker = SliceTracker(2)
    tracker.assign("a")
    got = tracker.assign("b")
    assert got == (1, 0)
    assert tracker.assign("b") is None  # every slice is in flight
    tracker.mark_used("b", 1)
    # b need not wait for a (which may itself be waiting on b at a sync): epoch 1 starts.
    assert tracker.assign("b") == (1, 1)
    # a's slice 0 counts for epoch 0; once used, it is still to be used in epoch 1.
    tracker.mark_used("a", 0)
    assert tracker.state(0) is SliceState.AVAILABLE
    assert tracker.assign("a") == (0, 1)


def test_steals_from_owner_with_most_available() -> None:
    tracker = SliceTracker(6)
    # Epoch 0: a owns 0,1,2; b owns 3,4; c owns 5.
    for worker in ("a", "a", "a", "b", "b", "c"):
        got = tracker.assign(worker)
        assert got is not None
        tracker.mark_used(worker, got[0])
    # Epoch 1: d owns nothing and nothing is unowned, so it steals a's lowest slice.
    assert tracker.assign("d") == (0, 1)
    assert tracker.owner(0) == "d"
    # Now a and b each have 2 available: tie broken by worker id -> a again.
    assert tracker.assign("d") == (1, 1)
    # b has 2, a has 1: steal from b.
    assert tracker.assign("e") == (3, 1)
    assert tracker.owner(3) == "e"


def test_owned_before_unowned() -> None:
    tracker = SliceTracker(3)
    tracker.assign("a")  # 0
    tracker.mark_used("a", 0)
    tracker.assign("b")  # 1
    tracker.mark_used("b", 1)
    tracker.assign("a")  # 2
    tracker.mark_used("a", 2)
    tracker.release_worker("b")  # slice 1 becomes unowned
    assert tracker.assign("a") == (0, 1)
    assert tracker.assign("a") == (2, 1)
    assert tracker.assign("a") == (1, 1)


def test_mark_used_checks_holder() -> None:
    tracker = SliceTracker(2)
    tracker.assign("a")
    with pytest.raises(LeaseError, match="not assigned"):
        tracker.mark_used("b", 0)
    with pytest.raises(LeaseError, match="not assigned"):
        tracker.mark_used("a", 1)
    tracker.mark_used("a", 0)
    with pytest.raises(LeaseError, match="not assigned"):
        tracker.mark_used("a", 0)
    with pytest.raises(DataError, match="out of range"):
        tracker.mark_used("a", 2)
    with pytest.raises(DataError, match="out of range"):
        tracker.state(-1)


def test_release_worker_returns_in_flight_slices() -> None:
    tracker = SliceTracker(4)
    tracker.assign("a")  # 0
    tracker.assign("a")  # 1
    tracker.mark_used("a", 0)
    tracker.assign("b")  # 2
    assert tracker.release_worker("a") == [1]
    assert tracker.state(0) is SliceState.USED
    assert tracker.state(1) is SliceState.AVAILABLE
    assert tracker.owner(0) is None
    assert tracker.owner(1) is None
    with pytest.raises(LeaseError):
        tracker.mark_used("a", 1)
    assert tracker.assign("b") == (1, 0)
    assert tracker.release_worker("nobody") == []


def test_given_back_slice_goes_to_another_worker_first() -> None:
    tracker = SliceTracker(3)
    tracker.set_workers(["a", "b", "c"])
    assert tracker.assign("a") == (0, 0)
    with pytest.raises(LeaseError, match="not assigned"):
        tracker.give_back("b", 0, 0)  # not b's
    with pytest.raises(LeaseError, match="not assigned"):
        tracker.give_back("a", 0, 1)  # not this assignment
    assert not tracker.give_back("a", 0, 0)  # a could not fetch it
    assert (tracker.state(0), tracker.owner(0)) == (SliceState.AVAILABLE, None)
    with pytest.raises(LeaseError, match="not assigned"):
        tracker.mark_used("a", 0)  # a holds it no more
    with pytest.raises(LeaseError, match="not assigned"):
        tracker.give_back("a", 0, 0)  # a repeated return
    # a is handed its other work first; slice 0 goes to the next worker that asks.
    assert tracker.assign("a") == (1, 0)
    assert tracker.assign("c") == (2, 0)
    assert tracker.assign("b") == (0, 0)
    assert not tracker.give_back("b", 0, 0)
    # When nothing else is left, a worker that failed on a slice is handed it again.
    assert tracker.assign("a") == (0, 0)
    for index, worker in ((0, "a"), (1, "a"), (2, "c")):
        tracker.mark_used(worker, index)
    # A new epoch forgets who failed on what.
    assert tracker.assign("b") == (0, 1)


def test_slice_every_trainer_gave_back_is_skipped_for_the_epoch() -> None:
    tracker = SliceTracker(2)
    tracker.set_workers(["a", "b"])
    assert tracker.assign("a") == (0, 0)
    assert tracker.assign("b") == (1, 0)
    assert not tracker.give_back("a", 0, 0)
    tracker.mark_used("b", 1)
    assert tracker.assign("b") == (0, 0)
    # No trainer can fetch slice 0 (say its only data node is down): the epoch goes on.
    assert tracker.give_back("b", 0, 0)
    assert tracker.state(0) is SliceState.USED
    stats = tracker.statistics()
    assert (stats.num_used, stats.num_skipped, stats.num_assigned) == (2, 1, 0)
    # The next epoch tries it again.
    assert tracker.assign("a") == (0, 1)
    assert tracker.statistics().num_skipped == 0


def test_statistics() -> None:
    tracker = SliceTracker(3)
    tracker.assign("a")
    tracker.assign("b")
    tracker.mark_used("a", 0)
    stats = tracker.statistics()
    assert (stats.num_available, stats.num_assigned, stats.num_used) == (1, 1, 1)
    assert stats.num_owners == 2
    assert stats.epoch == 0
    assert stats.num_slices == 3


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_slices"):
        SliceTracker(0)
    with pytest.raises(ValueError, match="worker"):
        SliceTracker(1).assign("")


def test_single_worker_runs_epochs() -> None:
    tracker = SliceTracker(3)
    handed = []
    for _ in range(7):
        got = tracker.assign("a")
        assert got is not None
        handed.append(got)
        tracker.mark_used("a", got[0])
    assert handed == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1), (0, 2)]


# --- state machine --------------------------------------------------------------------

WORKERS = ("w1", "w2", "w3", "w4")


class SliceMachine(RuleBasedStateMachine):
    """Random assign/use/release sequences against a model of who holds what."""

    def __init__(self) -> None:
        super().__init__()
        self.num_slices = 7
        self.tracker = SliceTracker(self.num_slices)
        self.epoch = 0
        self.held: dict[int, tuple[str, int]] = {}  # ASSIGNED slice -> (worker, epoch assigned in)
        self.used: dict[int, set[int]] = {0: set()}  # epoch -> slices used (or skipped) for it
        self.skipped: dict[int, set[int]] = {0: set()}  # epoch -> slices every trainer gave back
        self.failed: dict[tuple[int, int], set[str]] = {}  # (epoch, slice) -> workers that gave it back
        self.trainers: set[str] = set()

    def _new_epoch_if_needed(self, epoch: int) -> None:
        if epoch != self.epoch:
            assert epoch == self.epoch + 1
            # The epoch ended only once no slice was left: each was used or still in flight.
            assert len(self.used[self.epoch]) + len(self.held) == self.num_slices
            assert self.used[self.epoch]
            self.epoch = epoch
            self.used[epoch] = set()
            self.skipped[epoch] = set()

    def _available(self) -> set[int]:
        return set(range(self.num_slices)) - set(self.held) - self.used[self.epoch]

    @rule(worker=st.sampled_from(WORKERS))
    def assign(self, worker: str) -> None:
        got = self.tracker.assign(worker)
        if got is None:
            # Only when every slice is in flight.
            assert len(self.held) == self.num_slices
            return
        index, epoch = got
        self._new_epoch_if_needed(epoch)
        assert index not in self.held
        assert index not in self.used[self.epoch]
        self.held[index] = (worker, epoch)

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data())
    def mark_used(self, data: st.DataObject) -> None:
        index = data.draw(st.sampled_from(sorted(self.held)))
        worker, epoch = self.held[index]
        wrong = data.draw(st.sampled_from([w for w in WORKERS if w != worker]))
        with pytest.raises(LeaseError):
            self.tracker.mark_used(wrong, index)
        self.tracker.mark_used(worker, index)
        assert index not in self.used[epoch]  # never used twice for one epoch
        del self.held[index]
        self.used[epoch].add(index)

    @rule(worker=st.sampled_from(WORKERS))
    def release(self, worker: str) -> None:
        returned = self.tracker.release_worker(worker)
        expected = sorted(i for i, (w, _) in self.held.items() if w == worker)
        assert returned == expected
        for index in returned:
            del self.held[index]
        assert all(self.tracker.owner(i) != worker for i in range(self.num_slices))

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data())
    def give_back(self, data: st.DataObject) -> None:
        """A worker that could not fetch its slice hands it back: available again, unowned,
        or skipped for this epoch once every trainer has given it back."""
        index = data.draw(st.sampled_from(sorted(self.held)))
        worker, epoch = self.held[index]
        wrong = data.draw(st.sampled_from([w for w in WORKERS if w != worker]))
        with pytest.raises(LeaseError):
            self.tracker.give_back(wrong, index, epoch)
        with pytest.raises(LeaseError):
            self.tracker.give_back(worker, index, epoch + 1)
        failed = self.failed.setdefault((self.epoch, index), set())
        failed.add(worker)
        skipped = self.tracker.give_back(worker, index, epoch)
        assert skipped == (failed >= self.trainers | {worker})
        del self.held[index]
        if skipped:
            self.used[self.epoch].add(index)
            self.skipped[self.epoch].add(index)
        assert self.tracker.owner(index) is None

    @rule(workers=st.sets(st.sampled_from(WORKERS)))
    def set_workers(self, workers: set[str]) -> None:
        """Stripes change only which fresh slice comes first, never the invariants."""
        self.tracker.set_workers(workers)
        self.trainers = set(workers)

    @rule(worker=st.sampled_from(WORKERS))
    def drain(self, worker: str) -> None:
        """Everyone finishes what they hold, then one worker works to the epoch's end."""
        for index, (holder, epoch) in sorted(self.held.items()):
            self.tracker.mark_used(holder, index)
            self.used[epoch].add(index)
        self.held.clear()
        start = self.epoch
        for _ in range(self.num_slices + 1):
            got = self.tracker.assign(worker)
            assert got is not None
            index, epoch = got
            self._new_epoch_if_needed(epoch)
            assert index not in self.used[self.epoch]
            self.tracker.mark_used(worker, index)
            self.used[self.epoch].add(index)
            if self.epoch != start:
                return
        raise AssertionError("epoch did not end although every slice was handed out")

    @invariant()
    def states_match_model(self) -> None:
        assert self.tracker.epoch == self.epoch
        for index in range(self.num_slices):
            state = self.tracker.state(index)
            if index in self.held:
                # ASSIGNED to exactly one worker: the one in the model.
                assert state is SliceState.ASSIGNED
                assert self.tracker.owner(index) == self.held[index][0]
            elif index in self.used[self.epoch]:
                assert state is SliceState.USED
            else:
                # Released, never handed out, or used for an earlier epoch: never lost.
                assert state is SliceState.AVAILABLE
                assert index in self._available()
        stats = self.tracker.statistics()
        assert stats.num_assigned == len(self.held)
        assert stats.num_used == len(self.used[self.epoch])
        assert stats.num_skipped == len(self.skipped[self.epoch])


TestSliceMachine = SliceMachine.TestCase
TestSliceMachine.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)
