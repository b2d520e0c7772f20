"""The aggregate executor: the DiLoCo parameter server, running inside the worker.

Owns the global weights and the outer optimizer of one job: it serves the current weights
to trainers that ask, collects their pseudo-gradients with sample counts, closes a round when
every expected update arrived (or at the deadline with at least the minimum), computes the
sample-weighted mean and the Nesterov step (``training/outer.py``, in a thread), evaluates the
global model on a held-out slice, sends the new weights to every trainer, and reports
``RoundClosed`` to the scheduler. Late updates of a closed round are dropped and logged.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from hypha.errors import HyphaError, JobError, NotReadyError
from hypha.protocol import codec
from hypha.protocol import messages as m
from hypha.protocol.tasks import AggregateTask

if TYPE_CHECKING:
    import torch

    from hypha.net.host import Node
    from hypha.worker.jobs import Task
    from hypha.worker.transfers import Transfers

logger = logging.getLogger(__name__)
TORCH = trio.CapacityLimiter(1)


@dataclass
class _Update:
    sender: str
    samples: int
    path: Path


@dataclass
class _Round:
    number: int
    expected: set[str] = field(default_factory=set)
    min_updates: int = 1
    updates: dict[str, _Update] = field(default_factory=dict)
    first_arrival: float | None = None
    closed: bool = False
    """Set when the round's updates are taken: one arriving later is late, not aggregated."""
    changed: trio.Event = field(default_factory=trio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class _Maths:
    """The torch side, only ever called from a worker thread under ``TORCH``."""

    def __init__(self, doc: AggregateTask, work_dir: Path) -> None:
        from hypha.training.models import build_task_model
        from hypha.training.outer import NesterovOuter

        self.model = build_task_model(doc.model, doc.seed, work_dir)
        self.params: dict[str, torch.Tensor] = {
            n: p.detach().clone().float() for n, p in self.model.named_parameters()
        }
        self.outer = NesterovOuter(lr=doc.outer.lr, momentum=doc.outer.momentum)
        self.weights_encoding: m.Encoding = "fp32"  # full weights (for newcomers) are exact
        self.delta_encoding: m.Encoding = doc.encoding  # what each round's broadcast costs
        self.delta: dict[str, torch.Tensor] = {}
        self.residual: dict[str, torch.Tensor] = {}
        self.eval_batches: list[dict[str, torch.Tensor]] = []

    def write_weights(self, path: Path, round_: int, encoding: m.Encoding | None = None) -> None:
        from hypha.training.compress import save_tensors_file

        save_tensors_file(path, self.params, encoding or self.weights_encoding, {"round": str(round_)})

    def write_delta(self, path: Path, round_: int) -> None:
        """The round's applied change (already representable exactly in ``delta_encoding``)."""
        from hypha.training.compress import save_tensors_file

        save_tensors_file(path, self.delta, self.delta_encoding, {"round": str(round_), "kind": "delta"})

    def step(self, updates: list[_Update]) -> None:
        """Outer step; the change is broadcast encoded, with error feedback kept here.

        Trainers add the decoded change to the weights they hold, and so does this server:
        every copy stays bit-identical, and what the encoding rounds away is carried into the
        next round's change instead of being lost.
        """
        from hypha.training.compress import decode_tensors, encode_tensors, load_tensors_file
        from hypha.training.outer import weighted_mean

        tensors = [load_tensors_file(u.path)[0] for u in updates]
        mean = weighted_mean(tensors, [float(u.samples) for u in updates])  # name -> tensor, float32
        old = {n: p.clone() for n, p in self.params.items()}  # theta_r, {name: [*shape]}
        self.outer.step(self.params, mean)  # params: theta_r+1 in full precision
        wanted = {n: self.params[n] - old[n] + self.residual.get(n, 0.0) for n in old}  # {name: [*shape]}
        decoded, _ = decode_tensors(encode_tensors(wanted, self.delta_encoding))  # what trainers get
        self.residual = {n: wanted[n] - decoded[n] for n in old}
        self.delta = {n: decoded[n] for n in old}
        self.params = {n: old[n] + decoded[n] for n in old}  # the same fp32 add every trainer does

    def load_eval(self, path: Path, batch_size: int, num_batches: int) -> None:
        from safetensors.torch import load_file

        from hypha.training.diloco import iter_batches

        tensors = load_file(str(path))
        self.eval_batches = list(iter_batches(tensors, batch_size, seed=0))[:num_batches]

    def evaluate(self) -> float | None:
        if not self.eval_batches:
            return None
        from hypha.training.diloco import evaluate, load_params

        load_params(self.model, self.params)
        return float(evaluate(self.model, self.eval_batches))


class ParameterServer:
    """One job's parameter server on this worker."""

    def __init__(self, node: Node, task: Task, doc: AggregateTask, transfers: Transfers) -> None:
        self._node = node
        self._task = task
        self._doc = doc
        self._transfers = transfers
        self._maths: _Maths | None = None
        self.round = _Round(0, min_updates=doc.min_updates)
        self._weights: dict[int, Path] = {}
        self._finished = trio.Event()
        self.num_late = 0

    # --- requests routed here by the worker's transfer service ---------------------------

    async def on_update(self, offer: m.TensorOffer, sender: str, path: Path) -> None:
        current = self.round
        if offer.round != current.number or current.closed:
            self.num_late += 1
            state = "closing" if current.closed else "open"
            logger.warning(
                "dropped update of round %d from %s: round %d is %s",
                offer.round,
                sender,
                current.number,
                state,
            )
            await trio.Path(path).unlink(missing_ok=True)
            return
        current.updates[sender] = _Update(sender, offer.samples, path)
        if current.first_arrival is None:
            current.first_arrival = trio.current_time()
        current.notify()

    async def on_plan(self, plan: m.RoundPlan) -> None:
        if plan.round == self.round.number:
            self.round.expected = set(plan.trainers)
            self.round.min_updates = plan.min_updates
            self.round.notify()

    async def on_weights_request(self, peer: str, request: m.WeightsRequest) -> m.TensorOffer:
        number = self.round.number if request.round is None else request.round
        path = self._weights.get(number) or self._weights.get(self.round.number)
        if path is None:
            raise NotReadyError("weights are not ready yet")
        served = number if number in self._weights else self.round.number
        return await self._transfers.bulk.offer(
            path,
            receiver=peer,
            purpose="weights",
            name=path.name,
            job_id=self._doc.job_id,
            round=served,
            encoding=self._maths.weights_encoding if self._maths else "fp32",
        )

    async def on_finished(self) -> None:
        self._finished.set()

    # --- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        self._maths = await trio.to_thread.run_sync(_Maths, self._doc, self._task.work_dir, limiter=TORCH)
        await self._publish_weights(0)
        await self._load_eval()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._wait_finished, nursery.cancel_scope)
            while self.round.number < self._doc.rounds:
                await self._close_round()
            await self._finished.wait()

    async def _wait_finished(self, scope: trio.CancelScope) -> None:
        await self._finished.wait()
        await self._send_final_model()
        scope.cancel()

    async def _publish_weights(self, number: int) -> None:
        assert self._maths is not None
        path = self._task.work_dir / f"weights-{number:05d}.safetensors"
        await trio.to_thread.run_sync(self._maths.write_weights, path, number, limiter=TORCH)
        self._weights[number] = path
        for old in [n for n in self._weights if n < number - 1]:
            self._weights.pop(old).unlink(missing_ok=True)

    async def _load_eval(self) -> None:
        doc = self._doc
        if doc.eval_index is None or not doc.providers:
            return
        from hypha.data.cache import SliceRef

        ref = SliceRef(dataset=doc.dataset, index=doc.eval_index, sha256=doc.eval_sha256)
        self._transfers.set_providers(ref, list(doc.providers))
        assert self._maths is not None
        maths = self._maths
        try:
            # Pinned while torch reads it: a trainer's slice fetch on this worker could evict it.
            async with self._transfers.cache.open(ref) as path:
                await trio.to_thread.run_sync(
                    maths.load_eval, path, doc.batch_size, doc.eval_batches, limiter=TORCH
                )
        except HyphaError as exc:
            logger.warning("no held-out slice for evaluation: %s", exc)

    def _ready(self, current: _Round) -> bool:
        got = set(current.updates)
        if current.expected and current.expected <= got:
            return True
        if current.first_arrival is None or len(got) < max(1, current.min_updates):
            return False
        return trio.current_time() >= current.first_arrival + self._doc.round_deadline_seconds

    async def _close_round(self) -> None:
        current = self.round
        while not self._ready(current):
            deadline = math.inf
            if current.first_arrival is not None:
                deadline = current.first_arrival + self._doc.round_deadline_seconds
            with trio.move_on_at(deadline):
                await current.changed.wait()
        current.closed = True  # before the first await: a later update must not be lost silently
        # In worker order, not arrival order: the float sums are then reproducible.
        updates = [current.updates[worker] for worker in sorted(current.updates)]
        assert self._maths is not None
        await trio.to_thread.run_sync(self._maths.step, updates, limiter=TORCH)
        loss = await trio.to_thread.run_sync(self._maths.evaluate, limiter=TORCH)
        samples = sum(u.samples for u in updates)
        for update in updates:  # next round's updates overwrite these files (same size)
            self._transfers.bulk.recycle(update.path)
        self.round = _Round(
            current.number + 1, expected=set(current.expected), min_updates=current.min_updates
        )
        await self._publish_weights(current.number + 1)
        recipients = sorted(set(current.updates) | current.expected)
        logger.info(
            "round %d closed: %d updates, %d samples, loss %s", current.number, len(updates), samples, loss
        )
        await self._broadcast(current.number, recipients)
        await self._report(
            m.RoundClosed(
                job_id=self._doc.job_id,
                round=current.number,
                num_updates=len(updates),
                samples=samples,
                loss=loss,
            )
        )

    async def _broadcast(self, number: int, recipients: list[str]) -> None:
        assert self._maths is not None
        path = self._task.work_dir / f"delta-{number:05d}.safetensors"
        await trio.to_thread.run_sync(self._maths.write_delta, path, number, limiter=TORCH)
        encoding = self._maths.delta_encoding

        async def one(peer: str) -> None:
            try:
                await self._transfers.push(
                    path, [peer], purpose="weights", job_id=self._doc.job_id, round_=number, encoding=encoding
                )
            except HyphaError as exc:
                logger.warning("weights of round %d not delivered to %s: %s", number, peer, exc)

        async with trio.open_nursery() as nursery:
            for peer in recipients:
                nursery.start_soon(one, peer)
        await trio.Path(path).unlink(missing_ok=True)

    async def _report(self, msg: m.Msg) -> None:
        try:
            await self._node.request(self._doc.scheduler, msg, m.Ack)
        except HyphaError as exc:
            logger.warning("scheduler did not take %s: %s", type(msg).__name__, exc)

    async def _send_final_model(self) -> None:
        assert self._maths is not None
        path = self._task.work_dir / "model.safetensors"
        await trio.to_thread.run_sync(
            self._maths.write_weights, path, self.round.number, "fp32", limiter=TORCH
        )
        try:
            await self._transfers.push(
                path,
                [self._doc.scheduler],
                purpose="weights",
                job_id=self._doc.job_id,
                round_=self.round.number,
                name="model.safetensors",
            )
        except HyphaError as exc:
            logger.error("final model not delivered to the scheduler: %s", exc)


async def run_aggregate(node: Node, task: Task, transfers: Transfers | None) -> None:
    """Run the parameter server of ``task`` until the scheduler says the job is finished."""
    if transfers is None:
        raise JobError("this worker has no transfer services")
    doc = codec.decode_json(task.config, AggregateTask)
    server = ParameterServer(node, task, doc, transfers)
    transfers.parameter_servers[doc.job_id] = server
    transfers.aggregators[doc.job_id] = server.on_update
    try:
        await server.run()
    finally:
        transfers.parameter_servers.pop(doc.job_id, None)
        transfers.aggregators.pop(doc.job_id, None)
