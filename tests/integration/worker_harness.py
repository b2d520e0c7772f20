"""A job on one real worker, for tests of what its parameter server and trainer task accept.

Starts a gateway, a worker (aggregate and an idle train executor), a scheduler node that
leases the worker twice and dispatches a real parameter server task and a trainer task, and
peers of the worker and data roles that push (a planned trainer, a stranger, a data node).
Everything is a real node on 127.0.0.1 with a certificate of the test's CA.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from hypha.net.bulk import BulkService
from hypha.net.host import Node
from hypha.protocol import codec
from hypha.protocol import messages as m
from hypha.protocol.tasks import AggregateTask, CheckpointDoc, InnerDoc, ModelDoc, OuterDoc, TrainTask
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
    ps_config: bytes = b""
    """The parameter server task's document, as dispatched."""
    allocator: Allocator | None = None
    """The scheduler node's allocator (it leased the worker for both tasks)."""
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


async def peer_node(stack: trio.Nursery, node: Node) -> Peer:
    bulk = BulkService(node)
    await stack.start(bulk.run)
    peer = Peer(node, bulk)
    node.rpc.register(m.TensorPushRequest, peer.on_push)
    return peer


@asynccontextmanager
async def job_on_a_worker(
    pki: Pki, tmp: Path, *, rounds: int = 5, checkpoint: CheckpointDoc | None = None
) -> AsyncIterator[Job]:
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
            scheduler = await peer_node(nursery, sched_node)
            trainer = await peer_node(nursery, trainer_node)
            job = Job(
                worker=worker,
                scheduler=scheduler,
                trainer=trainer,
                stranger=await peer_node(nursery, stranger_node),
                data=await peer_node(nursery, data_node),
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

            async def on_ready(peer: str, ready: m.ParameterServerReady) -> m.Ack:
                return m.Ack()

            sched_node.rpc.register(m.TaskStatus, on_status)
            sched_node.rpc.register(m.ParameterServerReady, on_ready)
            sched_node.rpc.register(m.RoundClosed, on_closed)
            sched_node.rpc.register(m.JobMemberRequest, on_member)
            for peer in (trainer_node, stranger_node, data_node, sched_node):
                await peer.connect(worker.node.listen_addrs()[0])
            allocator = job.allocator = Allocator(sched_node, lease_seconds=60, offer_deadline_seconds=2)
            spec = WorkerSpec(resources=Resources(cpu=1, memory=1), executors=(PS_EXECUTOR, TRAIN_EXECUTOR))
            with trio.fail_after(60):
                grants = [await allocator.allocate(spec, Price(bid=1.0, max_price=5.0), 1) for _ in range(2)]
                ps_doc = AggregateTask(
                    job_id=JOB,
                    model=MODEL,
                    seed=0,
                    outer=OuterDoc(),
                    rounds=rounds,
                    scheduler=sched_node.peer_id,
                    checkpoint=checkpoint,
                )
                job.ps_config = codec.encode_json(ps_doc)
                job.ps_task = await dispatch(sched_node, grants[0][0], PS_EXECUTOR, codec.encode_json(ps_doc))
                train_doc = TrainTask(
                    job_id=JOB,
                    model=MODEL,
                    dataset="none",
                    batch_size=4,
                    seed=0,
                    inner=InnerDoc(warmup_steps=0),
                    parameter_server=worker.node.peer_id,
                )
                job.train_task = await dispatch(
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


async def dispatch(node: Node, grant: Grant, executor: m.ExecutorDescriptor, config: bytes) -> str:
    task_id = uuid.uuid4().hex
    request = m.DispatchTask(
        lease_id=grant.lease_id, task_id=task_id, job_id=JOB, executor=executor, config=config
    )
    reply = await node.request(grant.worker, request, m.Msg)
    assert isinstance(reply, m.Dispatched), reply
    return task_id
