"""A worker hands an assigned slice back when its fetch ends without the slice.

The network is a stand-in here (the failing-fetch path with real nodes, a real bridge and a
real executor is in ``tests/integration/test_execution.py``); what is under test is that a
cancelled fetch, even one whose cancellation arrives inside an exception group or while the
scheduler is still choosing the slice, still tells the scheduler, and that the cancellation
is not swallowed.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from hypha.protocol import messages as m
from hypha.worker.transfers import Transfers

SHA = "ab" * 32


class Network:
    """Answers the worker's requests: the scheduler assigns slice 3, the data node stalls."""

    def __init__(self) -> None:
        self.returned: list[m.SliceReturned] = []
        self.fetch_started = trio.Event()
        self.assigning = trio.Event()
        self.may_answer = trio.Event()
        self.may_answer.set()
        self.settings = SimpleNamespace(rpc_timeout_seconds=10.0)
        self.rpc = SimpleNamespace(register=lambda *args, **kwargs: None)

    async def request(self, peer: str, msg: m.Msg, expect: type[Any], **kwargs: Any) -> Any:
        if isinstance(msg, m.NextSliceRequest):
            self.assigning.set()
            await self.may_answer.wait()
            return m.SliceAssign(dataset="ds", index=3, epoch=2, sha256=SHA, providers=["data"])
        if isinstance(msg, m.SliceReturned):
            self.returned.append(msg)
            return m.Ack()
        assert isinstance(msg, m.SliceRequest)
        self.fetch_started.set()
        async with trio.open_nursery() as nursery:  # as a pull's byte loop does
            nursery.start_soon(trio.sleep_forever)
        raise AssertionError("unreachable")


@pytest.mark.parametrize("cancelled_while", ["fetching", "assigning"])
async def test_cancelled_fetch_gives_the_slice_back(tmp_path: Path, cancelled_while: str) -> None:
    network = Network()
    config = SimpleNamespace(work_dir=tmp_path, cache_slices=4, prefetch_depth=0)
    bulk = SimpleNamespace(recycle=lambda path: None)
    transfers = Transfers(network, bulk, config, update_sinks=lambda job_id: None, tasks={})  # type: ignore[arg-type]
    task = SimpleNamespace(scheduler="sched", job_id="job")
    finished = False
    if cancelled_while == "assigning":
        network.may_answer = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:

            async def fetch() -> None:
                nonlocal finished
                await transfers._fetch_assigned_slice(task, "ds", tmp_path / "task")  # type: ignore[arg-type]
                finished = True

            nursery.start_soon(fetch)
            if cancelled_while == "fetching":
                await network.fetch_started.wait()
                nursery.cancel_scope.cancel()  # the executor hung up
            else:
                await network.assigning.wait()
                nursery.cancel_scope.cancel()  # hung up while the scheduler was assigning
                network.may_answer.set()  # ... which it did
    assert not finished  # the cancellation went on through the fetch
    [returned] = network.returned
    assert (returned.job_id, returned.dataset, returned.index, returned.epoch) == ("job", "ds", 3, 2)
    assert returned.reason == "the fetch was cancelled"
