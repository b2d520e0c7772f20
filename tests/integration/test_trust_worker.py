"""Trust inside a job, on a worker: who may push updates, weights and files, and who gets weights.

Every node is real (gateway, worker, scheduler and attackers on 127.0.0.1, each with a
certificate of our CA; ``worker_harness.py``). The worker runs a real parameter server
(``runtime = "aggregate"``) and a trainer task; the attackers are admitted peers that are in no
job (a data node) or in the network as workers but not in the job's round plan. Issue 16,
findings 1 to 4.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import trio

from hypha.errors import RemoteError
from hypha.protocol import codes
from hypha.protocol import messages as m
from hypha.testing.cluster import Pki, wait_until
from tests.integration.worker_harness import JOB, job_on_a_worker, update_file


async def test_a_transfer_id_that_climbs_out_of_the_work_dir_writes_nothing(pki: Pki, tmp_path: Path) -> None:
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"keep me")
    async with job_on_a_worker(pki, tmp_path) as job:
        climb = "../" * 12 + str(victim.with_suffix(""))[1:]
        payload = update_file(tmp_path / "payload.safetensors")
        with trio.fail_after(60):
            # A data-role peer may push nothing to a worker.
            with pytest.raises(RemoteError) as refused:
                await job.data.push(
                    job.ps, payload, purpose="update", name="u", job_id=JOB, round=0, samples=8
                )
            assert refused.value.code == codes.FORBIDDEN
            # A worker-role peer (even the plan's trainer) cannot name a path.
            offer = await job.trainer.bulk.offer(
                payload, receiver=job.ps, purpose="update", name="u", job_id=JOB, round=0, samples=8
            )
            bad = msgspec.structs.replace(offer, transfer_id=climb)
            done = await job.trainer.node.request(job.ps, m.TensorPushRequest(offer=bad), m.TransferDone)
        assert not done.ok
        assert "transfer id" in done.detail
        assert victim.read_bytes() == b"keep me"
        assert job.worker.transfers.statistics().num_refused == 1
        assert not job.parameter_server().round.updates


async def test_updates_only_from_the_plan_once_per_round_bounded_and_finite(pki: Pki, tmp_path: Path) -> None:
    async with job_on_a_worker(pki, tmp_path) as job:
        good = update_file(tmp_path / "good.safetensors")
        with trio.fail_after(60):
            # A worker outside the plan claiming a huge sample count (the poisoning of finding 2).
            done = await job.stranger.push(
                job.ps, good, purpose="update", name="u", job_id=JOB, round=0, samples=10**9
            )
            assert not done.ok
            assert "not a trainer of round 0" in done.detail
            # The plan's trainer, but claiming more samples than a round allows.
            done = await job.trainer.push(
                job.ps, good, purpose="update", name="u", job_id=JOB, round=0, samples=10**9
            )
            assert not done.ok
            assert "samples claimed" in done.detail
            # The plan's trainer with a non-finite value in its update.
            poisoned = update_file(tmp_path / "nan.safetensors", poison=float("inf"))
            done = await job.trainer.push(
                job.ps, poisoned, purpose="update", name="u", job_id=JOB, round=0, samples=8
            )
            assert not done.ok
            assert "non-finite" in done.detail
            assert not job.parameter_server().round.updates
            # Now a good one: taken, and the round (one expected trainer) closes.
            done = await job.trainer.push(
                job.ps, good, purpose="update", name="u", job_id=JOB, round=0, samples=8
            )
            assert done.ok, done.detail
            await wait_until(lambda: job.closed)
            # The same trainer cannot send round 0 twice; round 1 is open now.
            done = await job.trainer.push(
                job.ps, good, purpose="update", name="u", job_id=JOB, round=0, samples=8
            )
        assert done.detail.startswith("late")  # dropped unread, not aggregated
        assert [(c.round, c.num_updates, c.samples) for c in job.closed] == [(0, 1, 8)]
        assert job.parameter_server().statistics().num_updates_aggregated == 1


async def test_weights_go_only_to_the_round_plan(pki: Pki, tmp_path: Path) -> None:
    async with job_on_a_worker(pki, tmp_path) as job:
        good = update_file(tmp_path / "good.safetensors")
        with trio.fail_after(60):
            # The stranger tries to join the round and to ask for the weights.
            await job.stranger.push(job.ps, good, purpose="update", name="u", job_id=JOB, round=0, samples=8)
            with pytest.raises(RemoteError) as refused:
                await job.stranger.node.request(job.ps, m.WeightsRequest(job_id=JOB), m.TensorOffer)
            assert refused.value.code == codes.FORBIDDEN
            offer = await job.trainer.node.request(job.ps, m.WeightsRequest(job_id=JOB), m.TensorOffer)
            assert offer.purpose == "weights"
            done = await job.trainer.push(
                job.ps, good, purpose="update", name="u", job_id=JOB, round=0, samples=8
            )
            assert done.ok, done.detail
            await wait_until(lambda: job.trainer.received)
        assert [(o.purpose, o.round) for o in job.trainer.received] == [("weights", 0)]
        assert job.stranger.received == []


async def test_a_trainer_takes_weights_only_from_its_parameter_server(pki: Pki, tmp_path: Path) -> None:
    async with job_on_a_worker(pki, tmp_path) as job:
        fake = update_file(tmp_path / "fake-weights.safetensors", scale=100.0)
        inbox = job.worker.jobs.tasks[job.train_task].inbox
        with trio.fail_after(60):
            with pytest.raises(RemoteError) as refused:
                await job.data.push(job.ps, fake, purpose="weights", name="w", job_id=JOB, round=1)
            assert refused.value.code == codes.FORBIDDEN
            done = await job.stranger.push(job.ps, fake, purpose="weights", name="w", job_id=JOB, round=1)
            assert not done.ok
            assert "parameter server" in done.detail
            # Files: only from a peer of the job, as its scheduler confirms.
            done = await job.stranger.push(job.ps, fake, purpose="file", name="f.bin", job_id=JOB)
            assert not done.ok
            assert "holds no task" in done.detail
            assert inbox.statistics().num_delivered == 0
            done = await job.trainer.push(job.ps, fake, purpose="file", name="f.bin", job_id=JOB)
            assert done.ok, done.detail
        assert [f.from_peer for f in inbox.pending] == [job.trainer.node.peer_id]
