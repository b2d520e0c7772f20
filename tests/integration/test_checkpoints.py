"""The parameter server's checkpoints on a real worker: written in the background, resumed from.

A real parameter server task (``worker_harness.py``) checkpoints into a local store every
round; its lease is released (the task stops) and a new parameter server task of the same job
is dispatched: it starts at the checkpointed round with the checkpointed weights, and a
checkpoint of another job in the same store is never taken for this one.
"""

from __future__ import annotations

from pathlib import Path

import trio

from hypha.checkpoint import StoreOptions, open_store
from hypha.protocol import messages as m
from hypha.protocol.tasks import CheckpointDoc
from hypha.resources import Resources
from hypha.scheduler.allocator import Price, WorkerSpec
from hypha.testing.cluster import Pki, wait_until
from tests.integration.worker_harness import JOB, PS_EXECUTOR, Job, dispatch, job_on_a_worker, update_file


async def close_round(job: Job, tmp_path: Path, round_: int) -> None:
    update = update_file(tmp_path / f"update-{round_}.safetensors", scale=0.01 * (round_ + 1))
    done = await job.trainer.push(
        job.ps, update, purpose="update", name="u", job_id=JOB, round=round_, samples=8
    )
    assert done.ok, done.detail
    await wait_until(lambda: len(job.closed) > round_)


async def test_a_new_parameter_server_resumes_from_the_last_checkpoint(pki: Pki, tmp_path: Path) -> None:
    store_dir = tmp_path / "checkpoints"
    doc = CheckpointDoc(store=str(store_dir), every_rounds=1, keep_last_n=2)
    async with job_on_a_worker(pki, tmp_path, rounds=10, checkpoint=doc) as job:
        first = job.parameter_server()
        with trio.fail_after(120):
            for round_ in range(3):
                await close_round(job, tmp_path, round_)
            await wait_until(lambda: first.checkpoints.statistics().num_written == 3)
            weights = {n: p.clone() for n, p in first._maths.params.items()}
            # The scheduler hears of committed checkpoints: a round's snapshot waits for the
            # previous write, so from round 1 on each RoundClosed names a newer checkpoint.
            names = [c.checkpoint for c in job.closed[1:]]
            assert all(names)
            assert len(set(names)) == len(names)
            # The server goes (its lease released: its task is stopped) and a new one comes.
            lease = job.worker.jobs.tasks[job.ps_task].lease_id
            await job.scheduler.node.request(job.ps, m.ReleaseLeaseRequest(lease_id=lease), m.Ack)
            await wait_until(lambda: job.parameter_server() is None)
            assert job.allocator is not None
            spec = WorkerSpec(resources=Resources(cpu=1, memory=1), executors=(PS_EXECUTOR,))
            [grant] = await job.allocator.allocate(spec, Price(bid=1.0, max_price=5.0), 1)
            await dispatch(job.scheduler.node, grant, PS_EXECUTOR, job.ps_config)
            await wait_until(lambda: job.parameter_server() is not None)
            second = job.parameter_server()
            await wait_until(lambda: second._maths is not None and second.round.number == 3)
        stats = second.checkpoints.statistics()
        assert stats.resumed_round == 3
        assert all(bool((second._maths.params[n] == w).all()) for n, w in weights.items())
        # keep_last_n = 2: the oldest of the three is gone.
        store = open_store(str(store_dir), StoreOptions(keep_last_n=2))
        assert [info.round for info in store.list()] == [2, 3]
