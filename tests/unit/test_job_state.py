"""``JobState``: every change it can go through survives a save and a restore exactly."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypha.config.job import JobSpec, ModelSection, job_from_dict, job_to_dict
from hypha.errors import HyphaError
from hypha.scheduler.state import DatasetRef, JobState, LeaseRecord, TaskRecord

WORKERS = ["w0", "w1", "w2", "w3"]
SPEC = JobSpec(name="prop", rounds=5, model=ModelSection(options={"dim": 16.0}))

op = st.one_of(
    st.tuples(st.just("lease"), st.sampled_from(WORKERS), st.floats(0, 2e9)),
    st.tuples(st.just("end_lease"), st.sampled_from(WORKERS), st.just(0.0)),
    st.tuples(st.just("dispatch"), st.sampled_from(WORKERS), st.just(0.0)),
    st.tuples(st.just("lose"), st.sampled_from(WORKERS), st.just(0.0)),
    st.tuples(st.just("assign"), st.sampled_from(WORKERS), st.just(0.0)),
    st.tuples(st.just("use"), st.sampled_from(WORKERS), st.just(0.0)),
    st.tuples(st.just("give_back"), st.sampled_from(WORKERS), st.just(0.0)),
    st.tuples(st.just("close"), st.sampled_from(WORKERS), st.floats(0.001, 5.0)),
    st.tuples(st.just("checkpoint"), st.sampled_from(WORKERS), st.just(0.0)),
)


def apply(state: JobState, name: str, worker: str, value: float) -> None:
    tracker = state.slices
    assert tracker is not None
    if name == "lease":
        state.lease_held(LeaseRecord("trainers", worker, f"lease-{worker}", value))
    elif name == "end_lease":
        state.lease_ended(f"lease-{worker}")
    elif name == "dispatch":
        state.task_dispatched(TaskRecord("trainer", worker, f"task-{worker}", f"lease-{worker}"))
    elif name == "lose":
        state.trainer_lost(worker)
    elif name == "assign":
        tracker.assign(worker)
        state.slices_changed()
    elif name in ("use", "give_back"):
        held = tracker.assigned(worker)
        if held:
            try:
                if name == "use":
                    tracker.mark_used(worker, held[0])
                else:
                    tracker.give_back(worker, held[0], tracker.epoch)
            except HyphaError:
                return  # a stale epoch: refused, nothing changed
            state.slices_changed()
    elif name == "close" and not state.done:
        state.round_closed(state.round, {worker: value})
    elif name == "checkpoint":
        state.checkpoint_written(f"ckpt/round-{state.round:05d}")


@settings(max_examples=200, deadline=None)
@given(st.lists(op, max_size=40))
def test_state_round_trips_after_any_changes(ops: list[tuple[str, str, float]]) -> None:
    state = JobState.create(SPEC)
    state.set_dataset(DatasetRef("ds", 9, "ab" * 32, ("d1", "d2"), eval_index=8))
    for name, worker, value in ops:
        apply(state, name, worker, value)
    saved = json.loads(json.dumps(state.to_dict()))
    restored = JobState.from_dict(saved)
    assert restored.to_dict() == state.to_dict()
    # The restored slice tracker makes the same next decisions as the live one.
    for worker in WORKERS:
        assert restored.slices is not None
        assert state.slices is not None
        assert restored.slices.assign(worker) == state.slices.assign(worker)


def test_job_id_is_kept_and_version_counts_changes() -> None:
    state = JobState.create(SPEC)
    assert state.job_id.startswith("prop-")
    state.set_dataset(DatasetRef("ds", 3, "cd" * 32, ("d1",), eval_index=2))
    before = state.version
    state.checkpoint_written("ckpt/1")
    assert state.version == before + 1
    assert JobState.from_dict(state.to_dict()).job_id == state.job_id


def test_a_saved_state_of_another_format_is_refused() -> None:
    doc = JobState.create(SPEC).to_dict()
    doc["format"] = 99
    with pytest.raises(ValueError, match="format"):
        JobState.from_dict(doc)


def test_spec_round_trips_through_its_table() -> None:
    assert job_from_dict(job_to_dict(SPEC)) == SPEC
