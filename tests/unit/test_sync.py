"""Sync planner: the forward simulation and per-trainer commit decisions."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypha.scheduler.sync import Plan, SyncPlanner, TrainerPace, simulate

# --- simulate ---------------------------------------------------------------------------


def pace(worker: str, spb: float, bs: int = 10, next_in: float | None = None) -> TrainerPace:
    return TrainerPace(
        worker=worker,
        seconds_per_batch=spb,
        batch_size=bs,
        next_batch_done_in_seconds=spb if next_in is None else next_in,
    )


def test_simulate_speeds_1_2_4() -> None:
    # In 16 s: a runs 16 batches, b 8, c 4 -> 28 batches of 10 = 280 samples.
    plan = simulate([pace("a", 1), pace("b", 2), pace("c", 4)], 280)
    assert plan == Plan(batches={"a": 16, "b": 8, "c": 4}, finish_seconds=16.0)


def test_simulate_ties_broken_by_worker_id() -> None:
    plan = simulate([pace("b", 1), pace("a", 1)], 10)
    assert plan.batches == {"b": 0, "a": 1}
    plan = simulate([pace("b", 1), pace("a", 1)], 11)
    assert plan.batches == {"b": 1, "a": 1}


def test_simulate_slow_trainer_gets_zero() -> None:
    plan = simulate([pace("fast", 1), pace("slow", 10)], 50)
    assert plan.batches == {"fast": 5, "slow": 0}
    assert plan.finish_seconds == 5.0


def test_simulate_uses_next_batch_offsets_and_batch_sizes() -> None:
    trainers = [pace("a", 2, bs=32, next_in=0.5), pace("b", 1, bs=8, next_in=-3)]
    plan = simulate(trainers, 64)
    # b overdue -> done at 0 (8), a at 0.5 (40), b at 1 (48), b at 2 (56), a at 2.5 (88).
    assert plan == Plan(batches={"a": 2, "b": 3}, finish_seconds=2.5)


def test_simulate_nothing_remaining() -> None:
    assert simulate([pace("a", 1)], 0) == Plan(batches={"a": 0}, finish_seconds=0.0)
    assert simulate([], -5) == Plan(batches={}, finish_seconds=0.0)


@pytest.mark.parametrize(
    "trainers",
    [
        [],
        [pace("a", 1), pace("a", 2)],
        [pace("a", 0)],
        [pace("a", 1, bs=0)],
    ],
)
def test_simulate_rejects(trainers: list[TrainerPace]) -> None:
    with pytest.raises(ValueError, match="trainer"):
        simulate(trainers, 10)


@given(
    st.lists(
        st.tuples(st.integers(1, 20), st.integers(1, 64), st.integers(0, 20)),
        min_size=1,
        max_size=5,
    ),
    st.integers(1, 2000),
)
def test_simulate_covers_budget_with_one_batch_slack(specs: list[tuple[int, int, int]], samples: int) -> None:
    trainers = [TrainerPace(f"w{i}", spb / 4, bs, next_in / 4) for i, (spb, bs, next_in) in enumerate(specs)]
    plan = simulate(trainers, samples)
    total = sum(plan.batches[t.worker] * t.batch_size for t in trainers)
    assert total >= samples
    # Dropping the last batch assigned would leave the budget uncovered.
    assert total - max(t.batch_size for t in trainers if plan.batches[t.worker]) < samples
    for t in trainers:
        n = plan.batches[t.worker]
        if n:
            last_done = max(0.0, t.next_batch_done_in_seconds) + (n - 1) * t.seconds_per_batch
            assert last_done <= plan.finish_seconds
        # Nobody could have squeezed in another batch before the finish.
        first_unused = max(0.0, t.next_batch_done_in_seconds) + n * t.seconds_per_batch
        assert first_unused >= plan.finish_seconds


# --- planner ----------------------------------------------------------------------------


@dataclass
class FakeTrainer:
    worker: str
    seconds_per_batch: float
    batch_size: int
    report_every: int = 1
    batches_done: int = 0
    unreported: int = 0
    sync_after: int | None = None
    finished_at: float | None = None
    history: list[int] = field(default_factory=list)


def finished_at(trainer: FakeTrainer) -> float:
    assert trainer.finished_at is not None
    return trainer.finished_at


def run_round(
    planner: SyncPlanner,
    trainers: list[FakeTrainer],
    budget: int,
    lose: dict[str, float] | None = None,
    start: float = 0.0,
) -> dict[str, FakeTrainer]:
    """Drive trainers with fixed speeds batch by batch until every one has synced."""
    lose = lose or {}
    planner.start_round(1, budget, [(t.worker, t.batch_size) for t in trainers], now=start)
    by_worker = {t.worker: t for t in trainers}
    events = [(start + t.seconds_per_batch, t.worker) for t in trainers]
    heapq.heapify(events)
    while events:
        now, worker = heapq.heappop(events)
        t = by_worker[worker]
        if worker in lose and now >= lose[worker]:
            planner.remove_trainer(worker, now)
            continue
        t.batches_done += 1
        t.unreported += 1
        if t.sync_after is not None:
            t.sync_after -= 1
        if t.sync_after == 0:
            t.finished_at = now
        if t.unreported >= t.report_every or t.sync_after == 0:
            n = t.unreported
            t.unreported = 0
            answer = planner.on_batches(worker, n, n * t.batch_size, n * t.seconds_per_batch, now=now)
            if answer is not None:
                assert t.sync_after is None
                t.history.append(answer)
                t.sync_after = answer
                if answer == 0:
                    t.finished_at = now
        if t.finished_at is None:
            heapq.heappush(events, (now + t.seconds_per_batch, worker))
    return by_worker


def test_planner_speeds_1_2_4_finish_together() -> None:
    planner = SyncPlanner(horizon_seconds=2.0)
    trainers = [FakeTrainer("a", 1, 10), FakeTrainer("b", 2, 10), FakeTrainer("c", 4, 10)]
    result = run_round(planner, trainers, 280)
    # Hand-computed: at t=14 a (230 samples done, 50 to go, finish in 2 s) commits to 2 more
    # batches and b to 1; c reports its 4th batch at t=16, when the budget is met.
    assert {w: t.batches_done for w, t in result.items()} == {"a": 16, "b": 8, "c": 4}
    assert {w: t.finished_at for w, t in result.items()} == {"a": 16, "b": 16, "c": 16}
    assert planner.committed() == {"a": 2, "b": 1, "c": 0}
    assert planner.round_complete
    stats = planner.statistics()
    assert stats.samples_done == 280
    assert stats.samples_outstanding == 0
    assert stats.num_committed == 3
    assert stats.seconds_per_batch == {"a": 1, "b": 2, "c": 4}


def test_planner_budget_exactly_met_commits_zero() -> None:
    planner = SyncPlanner(horizon_seconds=1.0)
    planner.start_round(3, 40, [("a", 10), ("b", 10)], now=0.0)
    # a alone would need 3 more batches (3 s > 1 s): continue.
    assert planner.on_batches("a", 1, 10, 1.0, now=1.0) is None
    # b's report of 3 slow batches meets the budget exactly: sync now.
    assert planner.on_batches("b", 3, 30, 30.0, now=30.0) == 0
    assert planner.on_batches("a", 1, 10, 1.0, now=30.0) == 0
    assert planner.committed() == {"a": 0, "b": 0}
    assert planner.round_complete


def test_planner_already_committed_gets_none() -> None:
    planner = SyncPlanner(horizon_seconds=100.0)
    planner.start_round(0, 100, [("a", 10), ("b", 10)], now=0.0)
    planner.on_batches("b", 1, 10, 1.0, now=1.0)
    first = planner.on_batches("a", 1, 10, 1.0, now=1.0)
    assert first is not None
    assert planner.on_batches("a", 1, 10, 1.0, now=2.0) is None
    assert planner.committed()["a"] == first


def test_planner_last_open_trainer_takes_the_rest() -> None:
    planner = SyncPlanner(horizon_seconds=0.5)
    planner.start_round(0, 1000, [("a", 10), ("b", 10)], now=0.0)
    planner.on_batches("a", 1, 10, 1.0, now=1.0)
    planner.remove_trainer("a", now=1.5)
    # b is alone: it covers 1000 - 10 - 10 = 980 samples, far beyond the horizon.
    assert planner.on_batches("b", 1, 10, 1.0, now=1.0) == 98


def test_planner_trainer_loss_replans_its_share() -> None:
    planner = SyncPlanner(horizon_seconds=2.0)
    trainers = [FakeTrainer("a", 1, 10), FakeTrainer("b", 1, 10), FakeTrainer("c", 1, 10)]
    result = run_round(planner, trainers, 300, lose={"c": 3.5})
    assert "c" not in planner.committed()
    assert planner.round_complete
    lost_samples = result["c"].batches_done * 10
    assert lost_samples == 30
    survivors = result["a"].batches_done + result["b"].batches_done
    # The survivors cover everything c did not: 270 samples, no more than a batch each over.
    assert 270 <= survivors * 10 <= 270 + 20
    assert abs(finished_at(result["a"]) - finished_at(result["b"])) <= 1.0


def test_planner_loss_of_committed_trainer_returns_batches() -> None:
    planner = SyncPlanner(horizon_seconds=5.0)
    planner.start_round(0, 100, [("a", 10), ("b", 10)], now=0.0)
    assert planner.on_batches("a", 1, 10, 1.0, now=1.0) is None  # b unknown, a alone: 9 s
    # 80 to go, 4 batches each, finishing in 4 s.
    assert planner.on_batches("b", 1, 10, 1.0, now=1.0) == 4
    assert planner.statistics().samples_outstanding == 40
    planner.remove_trainer("b", now=2.0)
    planner.remove_trainer("b", now=2.0)  # reporting a loss twice is harmless
    # b's 4 batches go back to a: 100 - 30 done = 70 samples.
    assert planner.on_batches("a", 1, 10, 1.0, now=2.0) == 7


def test_planner_waits_for_unknown_trainers_unless_within_horizon() -> None:
    # Choice under test: a trainer without an estimate is left out of the simulation, so
    # commits wait for it unless the known trainers alone finish within the horizon.
    planner = SyncPlanner(horizon_seconds=3.0)
    planner.start_round(0, 200, [("a", 10), ("b", 10)], now=0.0)
    # a alone would need 19 more batches (19 s): b's speed is unknown -> continue.
    assert planner.on_batches("a", 1, 10, 1.0, now=1.0) is None
    # A report with no duration gives no estimate either.
    assert planner.on_batches("b", 0, 0, 0.0, now=1.0) is None
    assert planner.statistics().seconds_per_batch == {"a": 1.0}
    for now in range(2, 17):
        assert planner.on_batches("a", 1, 10, 1.0, now=float(now)) is None
    # 170 done, a alone needs 3 more batches (3 s <= 3 s horizon): commit without b.
    assert planner.on_batches("a", 1, 10, 1.0, now=17.0) == 3
    # b is the only one left without a sync, and a's batches cover the rest.
    assert planner.on_batches("b", 0, 0, 0.0, now=17.0) == 0


def test_planner_sparse_reports_overshoot_by_at_most_one_report() -> None:
    # Reports every 5 batches (5 s) with a 1 s horizon: at t=10 a commits to 1 more batch
    # (20 to go) and b, reporting right after, finds the budget met.
    planner = SyncPlanner(horizon_seconds=1.0)
    trainers = [FakeTrainer("a", 1, 10, report_every=5), FakeTrainer("b", 1, 10, report_every=5)]
    result = run_round(planner, trainers, 170)
    assert {w: t.batches_done for w, t in result.items()} == {"a": 11, "b": 10}
    assert {w: t.finished_at for w, t in result.items()} == {"a": 11.0, "b": 10.0}


def test_planner_ema_and_estimates_survive_rounds() -> None:
    planner = SyncPlanner(smoothing=0.5)
    planner.start_round(0, 10_000, [("a", 10), ("b", 10)], now=0.0)
    planner.on_batches("a", 2, 20, 4.0, now=4.0)
    assert planner.statistics().seconds_per_batch["a"] == 2.0
    planner.on_batches("a", 1, 10, 4.0, now=8.0)
    assert planner.statistics().seconds_per_batch["a"] == 3.0
    planner.start_round(1, 10_000, [("a", 10), ("c", 10)], now=10.0)
    stats = planner.statistics()
    assert stats.round == 1
    assert stats.samples_done == 0
    assert stats.seconds_per_batch == {"a": 3.0}
    assert not planner.round_complete


def test_planner_counts_reports_of_the_next_round_that_came_early() -> None:
    planner = SyncPlanner(horizon_seconds=1.0)
    planner.start_round(0, 100, [("a", 10), ("b", 10)], now=0.0)
    # a sent its update and trains on while round 0 is closed: 3 batches of round 1 early.
    assert planner.record_ahead("a", 1, 3, 30, 6.0)
    assert not planner.record_ahead("a", 0, 1, 10, 1.0)  # the current round is not "ahead"
    assert not planner.record_ahead("a", 2, 1, 10, 1.0)  # nor is one two rounds on
    assert not planner.record_ahead("a", 1, -1, 10, 1.0)
    assert planner.statistics().samples_done == 0  # nothing counts for round 0
    planner.start_round(1, 100, [("a", 10), ("b", 10)], now=10.0)
    stats = planner.statistics()
    assert stats.samples_done == 30
    assert stats.seconds_per_batch == {"a": 2.0}
    assert not planner.round_complete  # the early report gets no plan
    # The early samples count: 100 - 30 - 10 - 10 = 50 left, about 6 s away, past the horizon.
    assert planner.on_batches("b", 1, 10, 2.0, now=12.0) is None
    assert planner.on_batches("a", 1, 10, 2.0, now=12.0) is None
    assert planner.statistics().samples_done == 50


def test_planner_drops_early_reports_of_a_round_that_does_not_follow() -> None:
    planner = SyncPlanner()
    planner.start_round(0, 100, [("a", 10)], now=0.0)
    assert planner.record_ahead("a", 1, 2, 20, 2.0)
    assert planner.record_ahead("gone", 1, 2, 20, 2.0)  # no longer a trainer at round 1
    planner.start_round(1, 100, [("a", 10)], now=1.0)
    assert planner.statistics().samples_done == 20
    planner.record_ahead("a", 2, 2, 20, 2.0)
    planner.start_round(1, 100, [("a", 10)], now=2.0)  # a restart of round 1, not round 2
    assert planner.statistics().samples_done == 0


def test_planner_add_trainer_mid_round() -> None:
    planner = SyncPlanner(horizon_seconds=2.0)
    planner.start_round(0, 100, [("a", 10)], now=0.0)
    planner.add_trainer("b", 10, now=0.0)
    with pytest.raises(ValueError, match="already"):
        planner.add_trainer("b", 10, now=0.0)
    assert planner.on_batches("a", 1, 10, 1.0, now=1.0) is None
    assert planner.on_batches("b", 1, 10, 1.0, now=1.0) is None  # 4 s each, not yet
    assert not planner.round_complete


def test_planner_rejects_bad_input() -> None:
    planner = SyncPlanner()
    with pytest.raises(ValueError, match="unknown"):
        planner.on_batches("a", 1, 10, 1.0, now=1.0)
    with pytest.raises(ValueError, match="sample_budget"):
        planner.start_round(0, 0, [("a", 10)], now=0.0)
    with pytest.raises(ValueError, match="duplicate"):
        planner.start_round(0, 10, [("a", 10), ("a", 10)], now=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        planner.start_round(0, 10, [("a", 0)], now=0.0)
    planner.start_round(0, 10, [("a", 10)], now=0.0)
    with pytest.raises(ValueError, match=">= 0"):
        planner.on_batches("a", -1, 10, 1.0, now=1.0)
    with pytest.raises(ValueError, match="smoothing"):
        SyncPlanner(smoothing=0.0)
    with pytest.raises(ValueError, match="horizon_seconds"):
        SyncPlanner(horizon_seconds=-1.0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 8), st.sampled_from([8, 16, 32]), st.integers(1, 4)),
        min_size=1,
        max_size=4,
    ),
    st.integers(50, 3000),
    st.sampled_from([0.5, 2.0, 5.0]),
)
def test_planner_constant_speeds_cover_budget_and_finish_together(
    specs: list[tuple[int, int, int]], budget: int, horizon: float
) -> None:
    trainers = [
        FakeTrainer(f"w{i}", spb / 2, bs, report_every=every) for i, (spb, bs, every) in enumerate(specs)
    ]
    planner = SyncPlanner(horizon_seconds=horizon)
    result = run_round(planner, trainers, budget)
    total = sum(t.batches_done * t.batch_size for t in result.values())
    assert planner.round_complete
    assert total >= budget
    # Overshoot is bounded by the batches trainers run between two reports.
    slack = sum(t.batch_size * t.report_every for t in trainers)
    assert total < budget + slack
    finishes = [finished_at(t) for t in result.values()]
    slowest_report = max(t.seconds_per_batch * t.report_every for t in trainers)
    assert max(finishes) - min(finishes) <= max(horizon, slowest_report) + slowest_report
