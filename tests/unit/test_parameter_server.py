"""The parameter server's round bookkeeping: which updates a round aggregates, which are late.

The torch maths, the transfer service and the node are stand-ins here (the real ones are
exercised by the cluster training tests); what is under test is the round state machine.
The round deadline runs on trio's ``MockClock`` (``autojump_clock``): times are exact.
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

from hypha.errors import JobError
from hypha.protocol import messages as m
from hypha.worker.executors.aggregate import ParameterServer, ParameterServers, ParameterServersStatistics


class Maths:
    delta_encoding = "fp32"
    weights_encoding = "fp32"

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

    def write_weights(self, path: Path, number: int, encoding: str = "fp32") -> None:
        path.write_bytes(b"w")

    def write_delta(self, path: Path, number: int) -> None:
        path.write_bytes(b"d")


class Transfers:
    def __init__(self) -> None:
        self.recycled: list[Path] = []
        self.bulk = SimpleNamespace(recycle=self.recycled.append)

    async def push(self, path: Path, peers: list[str], **kwargs: object) -> list[str]:
        return peers


class Node:
    async def request(self, peer: str, msg: object, expect: object) -> None:
        return None


class Rpc:
    """Keeps the handlers registered on it, by message name."""

    def __init__(self) -> None:
        self.handlers: dict[str, Callable[[str, Any], Awaitable[Any]]] = {}

    def register(self, kind: type, handler: Callable[[str, Any], Awaitable[Any]], **kwargs: object) -> None:
        self.handlers[kind.__name__] = handler


def update_file(tmp_path: Path, worker: str) -> Path:
    path = tmp_path / f"update-{worker}.safetensors"
    path.write_bytes(b"u")
    return path


async def test_update_arriving_while_a_round_closes_is_late_not_lost(tmp_path: Path) -> None:
    doc = SimpleNamespace(job_id="j", scheduler="s", min_updates=1, round_deadline_seconds=60.0)
    maths = Maths()
    ps = ParameterServer(Node(), SimpleNamespace(work_dir=tmp_path), doc, Transfers())  # type: ignore[arg-type]
    ps._maths = maths  # type: ignore[assignment]
    ps.round.expected = {"a"}
    offer = SimpleNamespace(round=0, samples=8)
    await ps.on_update(offer, "a", update_file(tmp_path, "a"))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ps._close_round)
        await trio.to_thread.run_sync(maths.stepping.wait, 60)
        # Round 0's updates are taken and being aggregated: b's is too late for it.
        straggler = update_file(tmp_path, "b")
        await ps.on_update(offer, "b", straggler)  # type: ignore[arg-type]
        maths.release.set()
    assert maths.aggregated == [["a"]]
    assert ps.num_late == 1
    assert not straggler.exists()
    assert ps.round.number == 1
    assert not ps.round.updates


def deadline_server(tmp_path: Path, *, expected: set[str], min_updates: int) -> tuple[ParameterServer, Maths]:
    doc = SimpleNamespace(job_id="j", scheduler="s", min_updates=min_updates, round_deadline_seconds=60.0)
    maths = Maths()
    maths.hold = False
    ps = ParameterServer(Node(), SimpleNamespace(work_dir=tmp_path), doc, Transfers())  # type: ignore[arg-type]
    ps._maths = maths  # type: ignore[assignment]
    ps.round.expected = expected
    ps.round.min_updates = min_updates
    return ps, maths


async def deliver_at(ps: ParameterServer, tmp_path: Path, worker: str, when: float) -> None:
    await trio.sleep_until(when)
    offer = SimpleNamespace(round=0, samples=8)
    await ps.on_update(offer, worker, update_file(tmp_path, worker))  # type: ignore[arg-type]


async def test_round_closes_at_its_deadline_with_the_updates_in(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
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
    tmp_path: Path, autojump_clock: trio.testing.MockClock
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
    tmp_path: Path, autojump_clock: trio.testing.MockClock
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
        assert servers.update_sink("j") == ps.on_update
        await rpc.handlers["RoundPlan"](
            "sched", m.RoundPlan(job_id="j", round=0, trainers=["a"], min_updates=1)
        )
        assert ps.round.expected == {"a"}
    assert servers.update_sink("j") is None
    with pytest.raises(JobError, match="no parameter server of job j"):
        await rpc.handlers["JobFinished"]("sched", m.JobFinished(job_id="j"))
    assert servers.statistics() == ParameterServersStatistics(num_running=0, num_unrouted=1)
