"""The scheduler's persisted job state: SQLite round trip, and taking up a dead scheduler's state."""

from __future__ import annotations

from pathlib import Path

import pytest

from hypha.config.job import JobSpec
from hypha.errors import ConfigError
from hypha.scheduler.slices import SliceState
from hypha.scheduler.state import DatasetRef, JobState, LeaseRecord, TaskRecord
from hypha.scheduler.store import StateStore

SPEC = JobSpec(name="persisted", rounds=5)


def busy_state() -> JobState:
    state = JobState.create(SPEC)
    state.set_dataset(DatasetRef("ds", 6, "ab" * 32, ("d1",), eval_index=5))
    assert state.slices is not None
    state.slices.set_workers(["t1"])
    state.task_dispatched(TaskRecord("parameter_server", "ps", "ps-task", "ps-lease"))
    state.task_dispatched(TaskRecord("trainer", "t1", "t1-task", "t1-lease"))
    state.lease_held(LeaseRecord("trainers", "t1", "t1-lease", 1e10))
    used = state.slices.assign("t1")
    in_flight = state.slices.assign("t1")
    assert used is not None
    assert in_flight is not None
    state.slices.mark_used("t1", used[0])
    state.round_closed(0, {})
    state.round_closed(1, {})
    state.checkpoint_written("ckpt-00000002-abcd")
    return state


def test_a_saved_state_loads_back_equal(tmp_path: Path) -> None:
    state = busy_state()
    store = StateStore(tmp_path / "state")
    store.save(state.to_dict())
    store.close()
    again = StateStore(tmp_path / "state").load("persisted")  # a new process would open it anew
    assert again is not None
    assert JobState.from_dict(again).to_dict() == state.to_dict()
    assert StateStore(tmp_path / "state").load("another-job") is None


def test_a_dead_schedulers_state_goes_on_from_its_round_without_its_tasks(tmp_path: Path) -> None:
    state = JobState.from_dict(busy_state().to_dict())
    assert state.slices is not None
    used = [i for i in range(state.slices.num_slices) if state.slices.state(i) is SliceState.USED]
    released = state.restarted()
    assert len(released) == 1  # the slice in flight goes back to AVAILABLE
    assert state.slices.state(released[0]) is SliceState.AVAILABLE
    assert [i for i in range(state.slices.num_slices) if state.slices.state(i) is SliceState.USED] == used
    assert (state.trainers, state.parameter_server, state.leases) == ({}, None, {})
    assert (state.round, state.finished_rounds, state.checkpoint) == (2, 2, "ckpt-00000002-abcd")


def test_a_state_dir_that_cannot_be_made_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="state_dir"):
        StateStore(blocker / "state")
