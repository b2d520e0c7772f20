"""Worker execution end to end: a scheduler leases a worker and runs real executor scripts.

Every node is real (gateway, data node, worker, scheduler node on 127.0.0.1); executors are
child processes that talk to their worker only through the job bridge on a Unix socket.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from hypha.data.manifest import Manifest, load_manifest
from hypha.data.prepare import prepare_dataset
from hypha.datanode.node import run_data_node
from hypha.net.bulk import BulkService
from hypha.net.host import Node
from hypha.protocol import codes
from hypha.protocol import messages as m
from hypha.resources import Resources
from hypha.scheduler.allocator import Allocator, Grant, Price, WorkerSpec
from hypha.testing.cluster import Pki, open_test_node, wait_until, worker_config
from hypha.testing.network import data_config
from hypha.worker import Worker, run_worker

SCRIPT = (m.ExecutorDescriptor(executor_class="train", name="script"),)

CLIENT = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from hypha.training.session import Session
    from hypha.protocol.bridge import ProgressReport, SliceRef

    session = Session.from_env()
    job = json.loads(session.job())
    mode = job["mode"]
    if mode == "ignore_term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        (session.work_dir / "pid").write_text(str(os.getpid()))
        open(job["pid_file"], "w").write(str(os.getpid()))
        while True:
            time.sleep(0.05)
    if mode == "receive":
        got = [f.path for f in session.receive(timeout=job["wait"])][:1]
        if job["expect"]:
            sys.exit(0 if got and got[0].endswith(job["expect"]) else 4)
        sys.exit(0 if not got else 5)
    if mode == "fetch_fails":
        try:
            session.fetch(SliceRef(dataset=job["dataset"]))
        except Exception as exc:
            print("fetch failed:", exc, file=sys.stderr)
            sys.exit(0)
        sys.exit(6)
    files = session.fetch(SliceRef(dataset=job["dataset"]))
    data = session.local_path(files[0].path).read_bytes()
    (session.work_dir / "result.txt").write_text(job["message"] + " " + files[0].sha256)
    delivered = session.send("result.txt", peers=[job["peer"]], purpose="file")
    answer = session.report_progress(ProgressReport(batches=1, samples=len(data), seconds=0.01))
    print("delivered to", delivered, "instruction", answer.action)
    if mode == "fail":
        print("something went badly wrong", file=sys.stderr)
        sys.exit(3)
    """
)


@dataclass
class SchedulerSide:
    """A scheduler node with just enough job logic for these tests."""

    node: Node
    allocator: Allocator
    bulk: BulkService
    manifest: Manifest
    data_peer: str
    statuses: list[m.TaskStatus] = field(default_factory=list)
    received: dict[str, bytes] = field(default_factory=dict)
    progress: list[m.ProgressRequest] = field(default_factory=list)
    returned: list[m.SliceReturned] = field(default_factory=list)
    wrong_sha256: bool = False
    """Assign slices with a digest no data node serves, so every fetch fails."""
    changed: trio.Event = field(default_factory=trio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_status(self, task_id: str, *states: str) -> m.TaskStatus:
        while True:
            for status in self.statuses:
                if status.task_id == task_id and status.state in states:
                    return status
            await self.changed.wait()

    async def dispatch(self, grant: Grant, doc: dict[str, Any], job_id: str = "job") -> str:
        task_id = uuid.uuid4().hex
        request = m.DispatchTask(
            lease_id=grant.lease_id,
            task_id=task_id,
            job_id=job_id,
            executor=SCRIPT[0],
            config=json.dumps(doc).encode(),
        )
        reply = await self.node.request(grant.worker, request, m.Msg)
        assert isinstance(reply, m.Dispatched), reply
        return task_id


async def _serve(side: SchedulerSide) -> None:
    node = side.node

    async def on_status(peer: str, status: m.TaskStatus) -> m.Ack:
        side.statuses.append(status)
        side.notify()
        return m.Ack()

    async def on_slice(peer: str, request: m.NextSliceRequest) -> m.SliceAssign:
        sha256 = "0" * 64 if side.wrong_sha256 else side.manifest.slices[0].sha256
        return m.SliceAssign(
            dataset=request.dataset, index=0, epoch=0, sha256=sha256, providers=[side.data_peer]
        )

    async def on_returned(peer: str, request: m.SliceReturned) -> m.Ack:
        side.returned.append(request)
        side.notify()
        return m.Ack()

    async def on_progress(peer: str, request: m.ProgressRequest) -> m.Msg:
        side.progress.append(request)
        side.notify()
        return m.Continue()

    async def on_push(peer: str, request: m.TensorPushRequest) -> m.TransferDone:
        dest = Path(os.environ.get("TMPDIR", "/tmp")) / f"hypha-test-{uuid.uuid4().hex}"
        await side.bulk.pull(request.offer, peer, dest)
        side.received[request.offer.name] = dest.read_bytes()
        dest.unlink()
        side.notify()
        return m.TransferDone(transfer_id=request.offer.transfer_id, ok=True)

    node.rpc.register(m.TaskStatus, on_status)
    node.rpc.register(m.NextSliceRequest, on_slice)
    node.rpc.register(m.SliceReturned, on_returned)
    node.rpc.register(m.ProgressRequest, on_progress)
    node.rpc.register(m.TensorPushRequest, on_push)


@asynccontextmanager
async def cluster(
    pki: Pki, tmp: Path, **worker_options: Any
) -> AsyncIterator[tuple[SchedulerSide, Worker, str]]:
    src = tmp / "text"
    src.mkdir()
    (src / "a.txt").write_text("all work and no play makes jack a dull boy\n" * 200)
    dataset = tmp / "ds"
    prepare_dataset(src, "jack", dataset, slice_samples=32, seq_len=16)
    script = tmp / "client.py"
    script.write_text(CLIENT)
    async with open_test_node(pki, "gw", "gateway", relay_hop=True) as gw, trio.open_nursery() as nursery:
        addr = gw.listen_addrs()[0]
        data_cfg = data_config(pki, addr, dataset)
        data = await nursery.start(lambda task_status: run_data_node(data_cfg, task_status=task_status))
        executors = [
            {"class": "train", "name": "script", "cmd": sys.executable, "args": [str(script)]},
            {"class": "train", "name": "broken", "cmd": str(tmp / "no-such-program")},
        ]
        config = worker_config(
            pki, "w", addr, tmp, executors=executors, kill_grace_seconds=1.0, **worker_options
        )
        worker = await nursery.start(lambda task_status: run_worker(config, task_status=task_status))
        async with open_test_node(pki, "sched", "scheduler", gateways=[addr]) as node:
            side = SchedulerSide(
                node=node,
                allocator=Allocator(node, lease_seconds=30, offer_deadline_seconds=2),
                bulk=BulkService(node),
                manifest=load_manifest(dataset),
                data_peer=data.node.peer_id,
            )
            await nursery.start(side.bulk.run)
            await _serve(side)
            yield side, worker, addr
        nursery.cancel_scope.cancel()


SPEC = WorkerSpec(resources=Resources(cpu=1, memory=1), executors=SCRIPT)


@pytest.mark.parametrize("mode", ["ok", "fail"])
async def test_executor_fetches_sends_reports_and_exits(pki: Pki, tmp_path: Path, mode: str) -> None:
    async with cluster(pki, tmp_path) as (side, worker, _addr):
        with trio.fail_after(60):
            [grant] = await side.allocator.allocate(SPEC, Price(bid=1.0, max_price=5.0), 1)
            await wait_until(lambda: worker.leases.ledger.statistics().num_renewable == 1)
            doc = {"mode": mode, "dataset": "jack", "message": "hello", "peer": side.node.peer_id}
            task_id = await side.dispatch(grant, doc)
            status = await side.wait_status(task_id, "finished", "failed")
        sha = side.manifest.slices[0].sha256
        assert side.received["result.txt"] == f"hello {sha}".encode()  # fetched through the bridge, sent back
        assert [p.event.samples for p in side.progress] == [side.manifest.slices[0].size]
        assert status.code == ""  # the executor ran: its own exit code tells the story
        if mode == "ok":
            assert status.state == "finished"
            assert status.exit_code == 0
        else:
            assert status.state == "failed"
            assert status.exit_code == 3
            assert "something went badly wrong" in status.detail
        assert any(s.state == "running" for s in side.statuses if s.task_id == task_id)
        with trio.fail_after(10):
            await wait_until(lambda: not list((tmp_path / "w").glob("task-*")))  # work dir removed


async def test_slice_that_cannot_be_fetched_is_given_back_to_the_scheduler(pki: Pki, tmp_path: Path) -> None:
    async with cluster(pki, tmp_path) as (side, worker, _addr):
        side.wrong_sha256 = True  # the data node's slice 0 never matches the assignment
        with trio.fail_after(60):
            [grant] = await side.allocator.allocate(SPEC, Price(bid=1.0, max_price=5.0), 1)
            await wait_until(lambda: worker.leases.ledger.statistics().num_renewable == 1)
            task_id = await side.dispatch(grant, {"mode": "fetch_fails", "dataset": "jack"})
            status = await side.wait_status(task_id, "finished", "failed")
        # The script saw the fetch fail, and the scheduler was told it will not train slice 0.
        assert (status.state, status.exit_code) == ("finished", 0), status.detail
        assert [(r.job_id, r.dataset, r.index, r.epoch) for r in side.returned] == [("job", "jack", 0, 0)]
        assert "sha256" in side.returned[0].reason


async def test_lease_expiry_kills_executor_that_ignores_sigterm(pki: Pki, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="hypha.worker")
    pid_file = tmp_path / "executor.pid"
    async with cluster(pki, tmp_path) as (_side, worker, addr):
        async with open_test_node(pki, "doomed", "scheduler", gateways=[addr]) as doomed:
            allocator = Allocator(doomed, lease_seconds=6.0, offer_deadline_seconds=2)
            with trio.fail_after(60):
                [grant] = await allocator.allocate(SPEC, Price(bid=2.0, max_price=5.0), 1)
                await wait_until(lambda: worker.leases.ledger.statistics().num_renewable == 1)
                reply = await doomed.request(
                    worker.node.peer_id,
                    m.DispatchTask(
                        lease_id=grant.lease_id,
                        task_id="t1",
                        job_id="j",
                        executor=SCRIPT[0],
                        config=json.dumps({"mode": "ignore_term", "pid_file": str(pid_file)}).encode(),
                    ),
                    m.Msg,
                )
                assert isinstance(reply, m.Dispatched)
                await wait_until(pid_file.exists)
        # The scheduler is gone and never renews: the lease lapses, the executor is stopped.
        pid = int(pid_file.read_text())
        task_dirs = list((tmp_path / "w").glob("task-*"))
        assert task_dirs
        with trio.fail_after(15):
            await wait_until(lambda: not _alive(pid) and not any(d.exists() for d in task_dirs))
        assert worker.leases.num_expired == 1
        assert any("ignored SIGTERM" in r.getMessage() for r in caplog.records)
        assert worker.leases.ledger.free() == worker.leases.ledger.capacity


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes; the worker reaps its children.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


async def test_two_tasks_on_one_worker_receive_only_their_own_files(pki: Pki, tmp_path: Path) -> None:
    async with cluster(pki, tmp_path, strategy="flexible", cpu=2.0) as (side, worker, _addr):
        with trio.fail_after(60):
            grants = await side.allocator.allocate(SPEC, Price(bid=1.0, max_price=5.0), 1)
            grants += await side.allocator.allocate(SPEC, Price(bid=1.0, max_price=5.0), 1)
            assert [g.worker for g in grants] == [worker.node.peer_id] * 2
            task_a = await side.dispatch(
                grants[0], {"mode": "receive", "wait": 20, "expect": "for-a.bin"}, "job-a"
            )
            task_b = await side.dispatch(grants[1], {"mode": "receive", "wait": 3, "expect": ""}, "job-b")
            await wait_until(lambda: len(worker.jobs.tasks) == 2)
            payload = tmp_path / "for-a.bin"
            payload.write_bytes(os.urandom(100_000))
            offer = await side.bulk.offer(
                payload, receiver=worker.node.peer_id, purpose="file", name="for-a.bin", job_id="job-a"
            )
            done = await side.node.request(
                worker.node.peer_id, m.TensorPushRequest(offer=offer), m.TransferDone
            )
            assert done.ok
            status_a = await side.wait_status(task_a, "finished", "failed")
            status_b = await side.wait_status(task_b, "finished", "failed")
        assert (status_a.state, status_a.exit_code) == ("finished", 0)  # got its file
        assert (status_b.state, status_b.exit_code) == ("finished", 0)  # got nothing


async def test_executor_that_cannot_start_is_reported_with_the_reason(pki: Pki, tmp_path: Path) -> None:
    async with cluster(pki, tmp_path) as (side, worker, _addr):
        with trio.fail_after(60):
            [grant] = await side.allocator.allocate(SPEC, Price(bid=1.0, max_price=5.0), 1)
            await wait_until(lambda: worker.leases.ledger.statistics().num_renewable == 1)
            request = m.DispatchTask(
                lease_id=grant.lease_id,
                task_id="broken-1",
                job_id="job",
                executor=m.ExecutorDescriptor(executor_class="train", name="broken"),
                config=b"{}",
            )
            assert isinstance(await side.node.request(grant.worker, request, m.Msg), m.Dispatched)
            status = await side.wait_status("broken-1", "failed", "finished")
        assert status.state == "failed"
        assert status.exit_code is None
        assert status.code == codes.EXECUTOR_START
        assert "cannot start executor" in status.detail
        assert "no-such-program" in status.detail
        # An executor the worker does not have is refused at dispatch with the reason.
        unknown = m.DispatchTask(
            lease_id=grant.lease_id,
            task_id="x",
            job_id="job",
            executor=m.ExecutorDescriptor(executor_class="train", name="nope"),
            config=b"{}",
        )
        reply = await side.node.request(grant.worker, unknown, m.Msg)
        assert isinstance(reply, m.Refused)
        assert "not configured" in reply.reason
