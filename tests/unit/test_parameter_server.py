"""The parameter server's round bookkeeping: which updates a round aggregates, which are late.

The torch maths, the transfer service and the node are stand-ins here (the real ones are
exercised by the cluster training tests); what is under test is the round state machine.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import trio

from hypha.worker.executors.aggregate import ParameterServer


class Maths:
    delta_encoding = "fp32"
    weights_encoding = "fp32"

    def __init__(self) -> None:
        self.stepping = threading.Event()
        self.release = threading.Event()
        self.aggregated: list[list[str]] = []

    def step(self, updates: list[Any]) -> None:
        self.aggregated.append([u.sender for u in updates])
        self.stepping.set()
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
