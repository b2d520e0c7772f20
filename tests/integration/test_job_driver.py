"""The scheduler's job driver answering trainers, the parameter server and strangers over real nodes.

A ``JobDriver`` runs on a scheduler node; a trainer and a parameter server are plain worker
nodes that send it the messages their executors' workers would. The pools lease nothing
(a ``FakeLeaser`` with no workers) and the tasks are entered in the job's state directly:
what is under test is what the driver does with a slice a trainer gives back and with
progress that runs a round ahead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from hypha.data.manifest import load_manifest
from hypha.data.prepare import prepare_dataset
from hypha.errors import RemoteError
from hypha.net.host import Node
from hypha.protocol import codes
from hypha.protocol import messages as m
from hypha.scheduler.job import JobContext, JobDriver
from hypha.scheduler.node import pool_spec
from hypha.scheduler.pool import Pool
from hypha.scheduler.results import JobRecorder
from hypha.scheduler.slices import SliceState
from hypha.scheduler.state import DatasetRef, JobState, TaskRecord
from hypha.testing.cluster import Pki, open_test_node
from hypha.testing.fakes import FakeLeaser
from hypha.testing.network import training_job


def job_doc() -> dict[str, object]:
    return {
        "dataset": "jack",
        "rounds": 3,
        "samples_per_round": 1000,
        "batch_size": 8,
        "model": {"kind": "builtin", "name": "gpt", "options": {"dim": 16, "num_layers": 1}},
    }


@dataclass
class Driven:
    """A job driver on a scheduler node, with one trainer and a parameter server in its state."""

    driver: JobDriver
    state: JobState
    sched: Node
    trainer: Node
    ps: Node


@asynccontextmanager
async def driven_job(pki: Pki, tmp_path: Path) -> AsyncIterator[Driven]:
    src = tmp_path / "text"
    src.mkdir()
    (src / "a.txt").write_text("all work and no play makes jack a dull boy\n" * 200)
    manifest = prepare_dataset(src, "jack", tmp_path / "ds", slice_samples=32, seq_len=16)
    assert manifest.num_slices >= 4
    job = training_job(tmp_path, "driver", job_doc(), num_trainers=2)
    async with (
        open_test_node(pki, "sched", "scheduler") as sched,
        open_test_node(pki, "trainer", "worker") as trainer,
        open_test_node(pki, "ps", "worker") as ps,
    ):
        leaser = FakeLeaser([])
        ctx = JobContext(
            node=sched,
            trainers=Pool(pool_spec("trainers", job.trainers, "train"), leaser),
            parameter_server=Pool(pool_spec("parameter_server", job.parameter_server, "aggregate"), leaser),
        )
        loaded = load_manifest(tmp_path / "ds")
        state = JobState.create(job)
        n = loaded.num_slices
        state.set_dataset(DatasetRef("jack", n, "00" * 32, ("data-node",), eval_index=n - 1))
        recorder = JobRecorder(job.out, job, state.job_id)
        await recorder.start()
        driver = JobDriver(ctx, state, loaded, recorder)

        async def plan_ack(peer: str, plan: m.RoundPlan) -> m.Ack:
            return m.Ack()

        ps.rpc.register(m.RoundPlan, plan_ack, roles={"scheduler"})
        state.task_dispatched(TaskRecord("parameter_server", ps.peer_id, "ps-task", "ps-lease"))
        state.task_dispatched(TaskRecord("trainer", trainer.peer_id, "t", "l"))
        driver.tracker.set_workers([trainer.peer_id, "other-trainer"])
        driver.planner.start_round(0, job.samples_per_round, [(trainer.peer_id, job.batch_size)], 0.0)
        for node in (trainer, ps):
            await node.connect(sched.listen_addrs()[0])
        yield Driven(driver, state, sched, trainer, ps)


async def test_driver_takes_back_returned_slices_and_counts_early_progress(pki: Pki, tmp_path: Path) -> None:
    async with driven_job(pki, tmp_path) as d:
        driver, state, sched, trainer, ps = d.driver, d.state, d.sched, d.trainer, d.ps
        with trio.fail_after(30):
            # The trainer is assigned a slice, cannot fetch it and gives it back.
            assign = await trainer.request(
                sched.peer_id, m.NextSliceRequest(job_id=driver.job_id, dataset="jack"), m.SliceAssign
            )
            returned = m.SliceReturned(
                job_id=driver.job_id,
                dataset="jack",
                index=assign.index,
                epoch=assign.epoch,
                reason="no provider answered",
            )
            await trainer.request(sched.peer_id, returned, m.Ack)
            assert driver.tracker.state(assign.index) is SliceState.AVAILABLE
            assert driver.tracker.assigned(trainer.peer_id) == []
            with pytest.raises(RemoteError, match="not assigned"):
                await trainer.request(sched.peer_id, returned, m.Ack)  # a repeated return
            wrong_job = m.SliceReturned(job_id="other", dataset="jack", index=0, epoch=0, reason="")
            with pytest.raises(RemoteError, match="no slices"):
                await trainer.request(sched.peer_id, wrong_job, m.Ack)
            # Its next slice is another one: the given-back slice waits for the other trainer.
            again = await trainer.request(
                sched.peer_id, m.NextSliceRequest(job_id=driver.job_id, dataset="jack"), m.SliceAssign
            )
            assert again.index != assign.index

            # The trainer got round 0's weights and reports round 1 before round 0 closed.
            early = m.BatchesDone(round=1, batches=3, samples=24, seconds=0.3)
            progress = m.ProgressRequest(job_id=driver.job_id, task_id="t", event=early)
            assert isinstance(await trainer.request(sched.peer_id, progress, m.Msg), m.Continue)
            assert driver.planner.statistics().samples_done == 0  # not round 0's samples
            closed = m.RoundClosed(job_id=driver.job_id, round=0, num_updates=1, samples=1000)
            await ps.request(sched.peer_id, closed, m.Ack)
        assert state.round == 1
        assert state.finished_rounds == 1
        stats = driver.planner.statistics()
        assert stats.round == 1
        assert stats.samples_done == 24  # the early batches count for round 1
        assert stats.seconds_per_batch == {trainer.peer_id: pytest.approx(0.1)}


async def test_driver_tells_only_its_own_workers_who_is_in_the_job(pki: Pki, tmp_path: Path) -> None:
    async with driven_job(pki, tmp_path) as d, open_test_node(pki, "stranger", "worker") as stranger:
        await stranger.connect(d.sched.listen_addrs()[0])

        def ask(about: str) -> m.JobMemberRequest:
            return m.JobMemberRequest(job_id=d.driver.job_id, peer=about)

        with trio.fail_after(30):
            # A trainer asks before taking a file from a peer: the parameter server is in the
            # job, the stranger is not.
            reply = await d.trainer.request(d.sched.peer_id, ask(d.ps.peer_id), m.JobMemberResponse)
            assert reply.member
            reply = await d.trainer.request(d.sched.peer_id, ask(stranger.peer_id), m.JobMemberResponse)
            assert not reply.member
            # Outsiders learn nothing about who is in the job, nor does a question about another job.
            with pytest.raises(RemoteError) as refused:
                await stranger.request(d.sched.peer_id, ask(d.trainer.peer_id), m.JobMemberResponse)
            assert refused.value.code == codes.FORBIDDEN
            other_job = m.JobMemberRequest(job_id="another-job", peer=d.ps.peer_id)
            with pytest.raises(RemoteError) as refused:
                await d.trainer.request(d.sched.peer_id, other_job, m.JobMemberResponse)
            assert refused.value.code == codes.FORBIDDEN
