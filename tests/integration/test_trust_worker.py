"""Trust inside a job, on a worker: who may push updates, weights and files, and who gets weights.

Every node is real (gateway, worker, scheduler and attackers on 127.0.0.1, each with a
certificate of our CA). The worker runs a real parameter server (``runtime = "aggregate"``)
and a trainer task; the attackers are admitted peers that are in no job (a data node) or in
the network as workers but not in the job's round plan. Issue 16, findings 1 to 4.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest
import trio

from hypha.errors import RemoteError
from hypha.net.bulk import BulkService
from hypha.net.host import Node
from hypha.protocol import codec, codes
from hypha.protocol import messages as m
from hypha.protocol.tasks import AggregateTask, InnerDoc, ModelDoc, OuterDoc, TrainTask
from hypha.resources import Resources
from hypha.scheduler.allocator import Allocator, Grant, Price, WorkerSpec
from hypha.testing.cluster import Pki, open_test_node, wait_until, worker_config
from hypha.worker import Worker, run_worker

JOB = "job-trust"
MODEL = ModelDoc(kind="builtin", name="mlp", options={"input_dim": 4, "hidden_dim": 8, "num_classes": 3})
PS_EXECUTOR = m.ExecutorDescriptor(executor_class="aggregate", name="parameter-server")
TRAIN_EXECUTOR = m.ExecutorDescriptor(executor_class="train", name="idle")
SAMPLES_PER_ROUND = 64


@dataclass
class Peer:
    """A node that pushes (and records what is pushed to it)."""

    node: Node
    bulk: BulkService
    received: list[m.TensorOffer] = field(default_factory=list)

    async def push(self, to: str, path: Path, **offer: object) -> m.TransferDone:
        made = await self.bulk.offer(path, receiver=to, **offer)  # type: ignore[arg-type]
        try:
            return await self.node.request(to, m.TensorPushRequest(offer=made), m.TransferDone)
        finally:
            self.bulk.withdraw(made.transfer_id)

    async def on_push(self, peer: str, request: m.TensorPushRequest) -> m.TransferDone:
        self.received.append(request.offer)
        return m.TransferDone(transfer_id=request.offer.transfer_id, ok=True)


@dataclass
class Job:
    worker: Worker
    scheduler: Peer
    trainer: Peer
    """A worker-role peer named in the round plan (it plays the trainer)."""
    stranger: Peer
    """A worker-role peer in the network but not in the job."""
    data: Peer
    """A data-role peer: in no job at all."""
    ps_task: str
    train_task: str
    closed: list[m.RoundClosed] = field(default_factory=list)

    @property
    def ps(self) -> str:
        return self.worker.node.peer_id

    def parameter_server(self):  # type: ignore[no-untyped-def]
        return self.worker.parameter_servers.get(JOB)


def model_params() -> dict[str, object]:
    from hypha.training.models import build_model

    return {n: p.detach().clone() for n, p in build_model("mlp", MODEL.options).named_parameters()}


def update_file(path: Path, scale: float = 0.01, poison: float | None = None) -> Path:
    import torch

    from hypha.training.compress import save_tensors_file

    tensors = {n: torch.full_like(t, scale) for n, t in model_params().items()}  # type: ignore[arg-type]
    if poison is not None:
        first = sorted(tensors)[0]
        tensors[first] = torch.full_like(tensors[first], poison)
    save_tensors_file(path, tensors)
    return path


async def _peer(stack: trio.Nursery, node: Node) -> Peer:
    bulk = BulkService(node)
    await stack.start(bulk.run)
    peer = Peer(node, bulk)
    node.rpc.register(m.TensorPushRequest, peer.on_push)
    return peer


@asynccontextmanager
async def job_on_a_worker(pki: Pki, tmp: Path) -> AsyncIterator[Job]:
    script = tmp / "idle.py"
    script.write_text("import time\nwhile True:\n    time.sleep(0.2)\n")
    executors = [
        {"class": "aggregate", "name": "parameter-server", "runtime": "aggregate"},
        {"class": "train", "name": "idle", "cmd": sys.executable, "args": [str(script)]},
    ]
    async with open_test_node(pki, "gw", "gateway", relay_hop=True) as gw, trio.open_nursery() as nursery:
        addr = gw.listen_addrs()[0]
        config = worker_config(
            pki, "w", addr, tmp, executors=executors, strategy="flexible", cpu=2.0, kill_grace_seconds=1.0
        )
        worker = await nursery.start(lambda task_status: run_worker(config, task_status=task_status))
        async with (
            open_test_node(pki, "sched", "scheduler", gateways=[addr]) as sched_node,
            open_test_node(pki, "trainer", "worker", gateways=[addr]) as trainer_node,
            open_test_node(pki, "stranger", "worker", gateways=[addr]) as stranger_node,
            open_test_node(pki, "data", "data", gateways=[addr]) as data_node,
        ):
            scheduler = await _peer(nursery, sched_node)
            trainer = await _peer(nursery, trainer_node)
            job = Job(
                worker=worker,
                scheduler=scheduler,
                trainer=trainer,
                stranger=await _peer(nursery, stranger_node),
                data=await _peer(nursery, data_node),
                ps_task="",
                train_task="",
            )

            async def on_closed(peer: str, closed: m.RoundClosed) -> m.Ack:
                job.closed.append(closed)
                return m.Ack()

            async def on_member(peer: str, request: m.JobMemberRequest) -> m.JobMemberResponse:
                return m.JobMemberResponse(member=request.peer in (trainer_node.peer_id, worker.node.peer_id))

            async def on_status(peer: str, status: m.TaskStatus) -> m.Ack:
                return m.Ack()

            sched_node.rpc.register(m.TaskStatus, on_status)
            sched_node.rpc.register(m.RoundClosed, on_closed)
            sched_node.rpc.register(m.JobMemberRequest, on_member)
            for peer in (trainer_node, stranger_node, data_node, sched_node):
                await peer.connect(worker.node.listen_addrs()[0])
            allocator = Allocator(sched_node, lease_seconds=60, offer_deadline_seconds=2)
            spec = WorkerSpec(resources=Resources(cpu=1, memory=1), executors=(PS_EXECUTOR, TRAIN_EXECUTOR))
            with trio.fail_after(60):
                grants = [await allocator.allocate(spec, Price(bid=1.0, max_price=5.0), 1) for _ in range(2)]
                ps_doc = AggregateTask(
                    job_id=JOB, model=MODEL, seed=0, outer=OuterDoc(), rounds=5, scheduler=sched_node.peer_id
                )
                job.ps_task = await _dispatch(
                    sched_node, grants[0][0], PS_EXECUTOR, codec.encode_json(ps_doc)
                )
                train_doc = TrainTask(
                    job_id=JOB,
                    model=MODEL,
                    dataset="none",
                    batch_size=4,
                    seed=0,
                    inner=InnerDoc(warmup_steps=0),
                    parameter_server=worker.node.peer_id,
                )
                job.train_task = await _dispatch(
                    sched_node, grants[1][0], TRAIN_EXECUTOR, codec.encode_json(train_doc)
                )
                await wait_until(lambda: job.parameter_server() is not None)
                await wait_until(lambda: job.parameter_server()._maths is not None)
                plan = m.RoundPlan(
                    job_id=JOB,
                    round=0,
                    trainers=[trainer_node.peer_id],
                    min_updates=1,
                    max_samples=2 * SAMPLES_PER_ROUND,
                )
                await sched_node.request(worker.node.peer_id, plan, m.Ack)
            yield job
        nursery.cancel_scope.cancel()


async def _dispatch(node: Node, grant: Grant, executor: m.ExecutorDescriptor, config: bytes) -> str:
    task_id = uuid.uuid4().hex
    request = m.DispatchTask(
        lease_id=grant.lease_id, task_id=task_id, job_id=JOB, executor=executor, config=config
    )
    reply = await node.request(grant.worker, request, m.Msg)
    assert isinstance(reply, m.Dispatched), reply
    return task_id


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
