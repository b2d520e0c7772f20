"""The job manager: dispatch under a lease, the runner of each runtime, and TaskStatus reports.

The node is a fake that keeps the RPC handlers and answers (or fails) the worker's requests
to the scheduler; the lease ledger, the job manager and, for the missing program, the process
runner with its bridge are the real ones. Retries run on trio's ``MockClock``; it jumps
only after half a second of real idleness, because the job manager makes and removes task
folders in threads and a clock that jumped while one runs would end the lease. The same
paths with real nodes are in ``tests/integration/test_execution.py``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from hypha.config.schema import ExecutorSection, WorkerConfig
from hypha.errors import HyphaError, RemoteError, RequestTimeoutError
from hypha.protocol import codes
from hypha.protocol import messages as m
from hypha.resources import Resources
from hypha.testing.cluster import wait_until
from hypha.testing.fakes import FakeRpcNode
from hypha.worker.executors.process import ProcessRunner
from hypha.worker.jobs import MAX_STATUS_ATTEMPTS, JobManager
from hypha.worker.leases import WorkerLeases
from hypha.worker.task import Exited, Runner, Task

SCRIPT = m.ExecutorDescriptor(executor_class="train", name="script")
LEASE_SECONDS = 24 * 3600.0
# In virtual time: a test that would hang fails at once instead.
DEADLINE = 3600.0


class FakeNode(FakeRpcNode):
    """Keeps handlers; the scheduler's side records statuses, failing the first ``num_failures``."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[m.TaskStatus] = []
        self.num_attempts = 0
        self.num_failures = 0
        self.failure: HyphaError = RequestTimeoutError("TaskStatus got no answer")
        self.changed = trio.Event()

    async def request(self, peer: str, msg: m.Msg, expect: type[Any], *args: Any, **kwargs: Any) -> Any:
        assert isinstance(msg, m.TaskStatus), msg
        self.num_attempts += 1
        if self.num_failures > 0:
            self.num_failures -= 1
            raise self.failure
        self.statuses.append(msg)
        self.changed.set()
        self.changed = trio.Event()
        return m.Ack()

    async def wait_status(self, *states: str) -> m.TaskStatus:
        while not any(s.state in states for s in self.statuses):
            await self.changed.wait()
        return next(s for s in self.statuses if s.state in states)


class Quick:
    """A runner whose executor exits at once with ``exit_code``."""

    def __init__(self, exit_code: int = 0) -> None:
        self.exit_code = exit_code
        self.ran: list[str] = []

    async def __call__(self, task: Task) -> Exited:
        self.ran.append(task.task_id)
        return Exited(self.exit_code, "" if self.exit_code == 0 else "it broke")


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Virtual time for the tests that ask for it (pytest-trio runs them on this clock)."""
    return trio.testing.MockClock(autojump_threshold=0.5)


def worker_config(tmp_path: Path) -> WorkerConfig:
    script = ExecutorSection(executor_class="train", name="script", cmd=str(tmp_path / "no-such-program"))
    return WorkerConfig(work_dir=tmp_path / "w", executors=[script], kill_grace_seconds=1.0)


async def start_jobs(
    nursery: trio.Nursery, tmp_path: Path, runner: Callable[[FakeNode, WorkerConfig], Runner]
) -> tuple[FakeNode, WorkerLeases, JobManager]:
    node = FakeNode()
    config = worker_config(tmp_path)
    leases = WorkerLeases(node, Resources(cpu=1, memory=1))  # type: ignore[arg-type]
    jobs = JobManager(node, leases, config, {"process": runner(node, config)})  # type: ignore[arg-type]
    leases.ledger.reserve("lease", "sched", Resources(cpu=1, memory=1), 5.0)
    # Only the lease-release test ends it.
    leases.ledger.promote("lease", "sched", LEASE_SECONDS)
    leases.changed()
    await nursery.start(leases.run)
    await nursery.start(jobs.run)
    return node, leases, jobs


async def dispatch(node: FakeNode, task_id: str = "t1") -> None:
    request = m.DispatchTask(
        lease_id="lease", task_id=task_id, job_id="job", executor=SCRIPT, config=json.dumps({}).encode()
    )
    assert await node.call("sched", request) == m.Dispatched(task_id=task_id)


async def test_missing_executor_program_fails_with_code_executor_start(tmp_path: Path) -> None:
    def process(node: FakeNode, config: WorkerConfig) -> Runner:
        return ProcessRunner(node, services=None, config=config)  # type: ignore[arg-type]

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            node, _leases, jobs = await start_jobs(nursery, tmp_path, process)
            await dispatch(node)
            status = await node.wait_status("failed", "finished")
            nursery.cancel_scope.cancel()
    assert (status.state, status.exit_code, status.code) == ("failed", None, codes.EXECUTOR_START)
    assert "cannot start executor" in status.detail
    assert [s.state for s in node.statuses] == ["running", "failed"]
    assert not (tmp_path / "w" / "task-t1").exists()
    assert jobs.statistics().num_failed == 1


@pytest.mark.parametrize("exit_code", [0, 3])
async def test_executor_that_ran_reports_its_exit_code_and_no_code(
    tmp_path: Path, clock: trio.testing.MockClock, exit_code: int
) -> None:
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            node, _leases, _jobs = await start_jobs(nursery, tmp_path, lambda node, config: Quick(exit_code))
            await dispatch(node)
            status = await node.wait_status("failed", "finished")
            nursery.cancel_scope.cancel()
    assert (status.state, status.exit_code, status.code) == (
        "finished" if exit_code == 0 else "failed",
        exit_code,
        "",
    )


async def test_status_that_got_no_answer_is_sent_again(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            node, _leases, jobs = await start_jobs(nursery, tmp_path, lambda node, config: Quick())
            node.num_failures = 3  # "running" twice and "finished" once get no answer
            await dispatch(node)
            await node.wait_status("finished")
            nursery.cancel_scope.cancel()
    assert [s.state for s in node.statuses] == ["running", "finished"]
    assert node.num_attempts == 5
    assert jobs.statistics().num_statuses_lost == 0


async def test_status_gives_up_after_bounded_attempts_and_says_so(
    tmp_path: Path, clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hypha.worker.jobs")
    runner = Quick()
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            node, _leases, jobs = await start_jobs(nursery, tmp_path, lambda node, config: runner)
            node.num_failures = MAX_STATUS_ATTEMPTS  # every send of "running" fails
            await dispatch(node)
            await node.wait_status("finished")
            nursery.cancel_scope.cancel()
    assert runner.ran == ["t1"]  # the executor still ran
    assert [s.state for s in node.statuses] == ["finished"]
    assert jobs.statistics().num_statuses_lost == 1
    assert any("gave up reporting running of task t1" in r.getMessage() for r in caplog.records)


async def test_status_the_scheduler_refused_is_not_sent_again(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            node, _leases, jobs = await start_jobs(nursery, tmp_path, lambda node, config: Quick())
            node.failure = RemoteError(codes.UNSUPPORTED, "no handler for TaskStatus")
            node.num_failures = 1
            await dispatch(node)
            await node.wait_status("finished")
            nursery.cancel_scope.cancel()
    assert [s.state for s in node.statuses] == ["finished"]
    assert node.num_attempts == 2
    assert jobs.statistics().num_statuses_lost == 1


async def test_status_is_not_retried_once_the_lease_is_gone(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    release = trio.Event()

    class Held:
        async def __call__(self, task: Task) -> Exited:
            await release.wait()
            return Exited(0)

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            node, _leases, jobs = await start_jobs(nursery, tmp_path, lambda node, config: Held())
            await dispatch(node)
            await node.wait_status("running")
            node.num_failures = MAX_STATUS_ATTEMPTS
            await node.call("sched", m.ReleaseLeaseRequest(lease_id="lease"))  # cancels the task
            with trio.fail_after(1):
                await wait_until(lambda: jobs.statistics().num_statuses_lost > 0)
            nursery.cancel_scope.cancel()
    assert node.num_attempts == 2  # "running", then "cancelled" once: nobody holds the lease
    assert jobs.statistics().num_cancelled == 1
