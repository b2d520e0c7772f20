"""The parameter server's round bookkeeping: which updates a round aggregates, which are late,
which are refused, and who is sent the weights.

The torch maths, the transfer service and the node are stand-ins here (the real ones are
exercised by the cluster training tests and ``tests/integration/test_trust_worker.py``);
what is under test is the round state machine. The round deadline and the wait for a round
plan run on trio's ``MockClock``: times are exact. The clock jumps only after 0.5 s of real
idleness (``clock``), because every received update is checked in a worker thread, and a
clock that jumped while that thread ran would close rounds before their updates are in.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from hypha.errors import ForbiddenError, JobError, NotReadyError
from hypha.protocol import messages as m
from hypha.worker.executors.aggregate import PLAN_WAIT_SECONDS, ParameterServer
from hypha.worker.executors.parameter_servers import ParameterServers, ParameterServersStatistics


class Maths:
    delta_encoding = "fp32"
    weights_encoding = "fp32"
    max_update_bytes = 1000
    problem = ""

    def __init__(self) -> None:
        self.stepping = threading.Event()
        self.release = threading.Event()
        self.aggregated: list[list[str]] = []

        self.closed_at: list[float] = []
        self.hold = True

    def step(self, updates: list[Any]) -> None:
        self.aggregated.append([u.sender for u in updates])
        self.closed_at.append(trio.from_thread.run_sync(trio.current_time))
        self.stepping.set()
        if self.hold:
            self.release.wait(timeout=60)

    def evaluate(self) -> None:
        return None

    def check_update(self, path: Path) -> str:
        return self.problem

    def write_weights(self, path: Path, number: int, encoding: str = "fp32") -> None:
        path.write_bytes(b"w")

    def write_delta(self, path: Path, number: int) -> None:
        path.write_bytes(b"d")


class Transfers:
    def __init__(self) -> None:
        self.recycled: list[Path] = []
        self.pushed: list[str] = []
        self.bulk = SimpleNamespace(recycle=self.recycled.append)

    async def push(self, path: Path, peers: list[str], **kwargs: object) -> list[str]:
        self.pushed += peers
        return peers


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Virtual time for the tests that ask for it (pytest-trio runs them on this clock)."""
    return trio.testing.MockClock(autojump_threshold=0.5)


class Node:
    async def request(self, peer: str, msg: object, expect: object) -> None:
        return None


class Rpc:
    """Keeps the handlers registered on it, by message name."""

    def __init__(self) -> None:
        self.handlers: dict[str, Callable[[str, Any], Awaitable[Any]]] = {}

    def register(self, kind: type, handler: Callable[[str, Any], Awaitable[Any]], **kwargs: object) -> None:
        self.handlers[kind.__name__] = handler


async def push(ps: ParameterServer, worker: str, *, round_: int = 0, samples: int = 8, size: int = 1) -> str:
    """``worker`` pushes an update of ``round_``; returns the server's note ("" when kept)."""
    offer = m.TensorOffer(
        transfer_id=f"t-{worker}-{round_}",
        purpose="update",
        size=size,
        sha256="0" * 64,
        token="t",
        job_id="j",
        round=round_,
        samples=samples,
    )

    async def pull(dest: Path) -> None:
        dest.write_bytes(b"u")

    return await ps.receive_update(offer, worker, pull)


async def test_update_arriving_while_a_round_closes_is_late_not_lost(tmp_path: Path) -> None:
    doc = SimpleNamespace(
        job_id="j", scheduler="s", checkpoint=None, min_updates=1, round_deadline_seconds=0.0
    )
    maths = Maths()
    ps = ParameterServer(Node(), SimpleNamespace(work_dir=tmp_path), doc, Transfers())  # type: ignore[arg-type]
    ps._maths = maths  # type: ignore[assignment]
    ps.round.expected = {"a", "b"}
    assert await push(ps, "a") == ""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ps._close_round)  # the deadline is 0 s: it closes with a's alone
        await trio.to_thread.run_sync(maths.stepping.wait, 60)
        # Round 0's updates are taken and being aggregated: b's is too late for it.
        note = await push(ps, "b")
        maths.release.set()
    assert maths.aggregated == [["a"]]
    assert note.startswith("late")
    assert ps.num_late == 1
    assert sorted(p.name for p in (tmp_path / "incoming").iterdir()) == ["t-a-0.safetensors"]  # b's unread
    assert ps.round.number == 1
    assert not ps.round.updates


def deadline_server(tmp_path: Path, *, expected: set[str], min_updates: int) -> tuple[ParameterServer, Maths]:
    doc = SimpleNamespace(
        job_id="j", scheduler="s", checkpoint=None, min_updates=min_updates, round_deadline_seconds=60.0
    )
    maths = Maths()
    maths.hold = False
    ps = ParameterServer(Node(), SimpleNamespace(work_dir=tmp_path), doc, Transfers())  # type: ignore[arg-type]
    ps._maths = maths  # type: ignore[assignment]
    ps.round.expected = expected
    ps.round.min_updates = min_updates
    return ps, maths


async def deliver_at(ps: ParameterServer, tmp_path: Path, worker: str, when: float) -> None:
    await trio.sleep_until(when)
    assert await push(ps, worker) == ""


async def test_round_closes_at_its_deadline_with_the_updates_in(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    ps, maths = deadline_server(tmp_path, expected={"a", "b"}, min_updates=1)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(deliver_at, ps, tmp_path, "a", start + 5.0)
        await ps._close_round()
    # b never came: the round closed 60 s after the first update, with a's alone.
    assert maths.aggregated == [["a"]]
    assert maths.closed_at == [start + 5.0 + 60.0]
    assert ps.round.number == 1
    assert ps.statistics().num_rounds_closed == 1


async def test_round_closes_as_soon_as_every_expected_update_is_in(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    ps, maths = deadline_server(tmp_path, expected={"a", "b"}, min_updates=1)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(deliver_at, ps, tmp_path, "a", start + 5.0)
        nursery.start_soon(deliver_at, ps, tmp_path, "b", start + 30.0)
        await ps._close_round()
    assert maths.aggregated == [["a", "b"]]
    assert maths.closed_at == [start + 30.0]


async def test_round_past_its_deadline_waits_for_the_minimum(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    ps, maths = deadline_server(tmp_path, expected={"a", "b", "c"}, min_updates=2)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(deliver_at, ps, tmp_path, "a", start + 5.0)
        nursery.start_soon(deliver_at, ps, tmp_path, "b", start + 200.0)
        await ps._close_round()
    # The deadline (65 s) passed with one update; the round closed when the second came.
    assert maths.aggregated == [["a", "b"]]
    assert maths.closed_at == [start + 200.0]


async def test_requests_for_a_job_without_a_parameter_server_are_refused(tmp_path: Path) -> None:
    rpc = Rpc()
    servers = ParameterServers(SimpleNamespace(rpc=rpc))  # type: ignore[arg-type]
    ps, _ = deadline_server(tmp_path, expected=set(), min_updates=1)
    assert servers.update_sink("j") is None
    with servers.registered("j", ps):
        assert servers.update_sink("j") is ps
        await rpc.handlers["RoundPlan"]("s", m.RoundPlan(job_id="j", round=0, trainers=["a"], min_updates=1))
        assert ps.round.expected == {"a"}
        # Another scheduler cannot rewrite the plan (it would decide who pushes and who gets weights).
        with pytest.raises(ForbiddenError, match="only from the job's scheduler"):
            await rpc.handlers["RoundPlan"](
                "other", m.RoundPlan(job_id="j", round=0, trainers=["mallory"], min_updates=1)
            )
        assert ps.round.expected == {"a"}
    assert servers.update_sink("j") is None
    with pytest.raises(JobError, match="no parameter server of job j"):
        await rpc.handlers["JobFinished"]("sched", m.JobFinished(job_id="j"))
    assert servers.statistics() == ParameterServersStatistics(num_running=0, num_unrouted=1)


async def test_update_from_outside_the_plan_is_refused_after_a_moment_unread(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    ps, _ = deadline_server(tmp_path, expected={"a"}, min_updates=1)
    start = trio.current_time()
    with pytest.raises(ForbiddenError, match="not a trainer of round 0"):
        await push(ps, "mallory")
    assert trio.current_time() - start == PLAN_WAIT_SECONDS  # it waited for a plan naming it
    assert not (tmp_path / "incoming").exists()  # nothing was pulled
    assert not ps.round.updates


async def test_update_waits_for_the_plan_that_names_its_trainer(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    ps, _ = deadline_server(tmp_path, expected={"a"}, min_updates=1)

    async def plan_later() -> None:
        await trio.sleep(1.0)
        await ps.on_plan("s", m.RoundPlan(job_id="j", round=0, trainers=["a", "b"], min_updates=1))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(plan_later)
        assert await push(ps, "b") == ""
    assert set(ps.round.updates) == {"b"}


@pytest.mark.parametrize(
    ("samples", "size", "problem", "match"),
    [
        (0, 1, "", "at least one sample"),
        (65, 1, "", "65 samples claimed; round 0 allows 64"),
        (8, 1001, "", "update of 1001 bytes"),
        (8, 1, "w holds non-finite values", "non-finite"),
    ],
)
async def test_update_that_claims_too_much_or_holds_bad_values_is_refused(
    tmp_path: Path, samples: int, size: int, problem: str, match: str
) -> None:
    ps, maths = deadline_server(tmp_path, expected={"a"}, min_updates=1)
    ps.round.max_samples = 64
    maths.problem = problem
    with pytest.raises(ForbiddenError, match=match):
        await push(ps, "a", samples=samples, size=size)
    assert not ps.round.updates
    assert not list(tmp_path.glob("incoming/*"))  # refused before the pull, or removed after it


async def test_second_update_of_a_round_is_refused(tmp_path: Path) -> None:
    ps, _ = deadline_server(tmp_path, expected={"a", "b"}, min_updates=1)
    assert await push(ps, "a") == ""
    with pytest.raises(ForbiddenError, match="already sent"):
        await push(ps, "a")
    assert list(ps.round.updates) == ["a"]


async def test_weights_go_to_the_plan_not_to_every_sender(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    ps, _ = deadline_server(tmp_path, expected={"a", "b"}, min_updates=1)
    transfers = ps._transfers
    assert await push(ps, "a") == ""
    assert await push(ps, "b") == ""
    # b is lost before the round closes: the scheduler's plan no longer names it.
    await ps.on_plan("s", m.RoundPlan(job_id="j", round=0, trainers=["a"], min_updates=1))
    await ps._close_round()
    assert transfers.pushed == ["a"]  # type: ignore[attr-defined]


async def test_weights_request_only_from_the_plan_or_the_scheduler(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    ps, _ = deadline_server(tmp_path, expected={"a"}, min_updates=1)
    with pytest.raises(ForbiddenError, match="not a trainer"):
        await ps.on_weights_request("mallory", m.WeightsRequest(job_id="j"))
    # The plan's trainer and the scheduler get past the check (no weights are out yet).
    for peer in ("a", "s"):
        with pytest.raises(NotReadyError):
            await ps.on_weights_request(peer, m.WeightsRequest(job_id="j"))
