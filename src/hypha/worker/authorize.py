"""Who may push what to this worker, and who may ask its parameter servers for weights.

The one place the worker's rules of trust live; the data plane (``transfers.py``) and the
parameter server (``executors/aggregate.py``) hold the state and call these checks before
they pull a byte or serve one. The rules, by what arrives:

- every push: its transfer id, file name and job id are safe names (``protocol/names.py``);
- an **update**: only to this job's parameter server, from a trainer of the current round
  plan, once per round, claiming 1 to ``max_samples`` samples and at most the bytes a whole
  encoded model takes (the values are checked finite and of the model's shapes once
  received, by the parameter server);
- **weights**: only to a trainer of the job, from the parameter server its task names;
- a **file**: only to a trainer of the job, from a peer of the same job: its scheduler, its
  parameter server, or a peer its scheduler confirms holds a task in it (``Membership``);
- a **weights request**: only from a trainer of the current round plan or the job's scheduler;
- a **round plan** or **job finished**: only from the job's own scheduler (any other peer with
  the scheduler role would otherwise decide who may push updates and get the weights).

A refusal raises ``ForbiddenError`` with the reason; the caller answers with it and logs it.
Admission (the CA) and the RPC layer's role check come first; nothing here trusts the role
alone.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from hypha.errors import ForbiddenError, HyphaError
from hypha.protocol import messages as m
from hypha.protocol.names import UnsafeNameError, check_name

logger = logging.getLogger(__name__)

MEMBERSHIP_TTL_SECONDS = 30.0
"""How long a scheduler's answer to ``JobMemberRequest`` is trusted before it is asked again."""

Pull = Callable[[Path], Awaitable[object]]
"""``await pull(dest)``: fetch the offered bytes into ``dest`` (checked against the offer)."""


class UpdateSink(Protocol):
    """A parameter server taking pushed updates (``ParameterServer.receive_update``)."""

    async def receive_update(self, offer: m.TensorOffer, sender: str, pull: Pull) -> str:
        """Authorize, pull and keep one update; return a note for the sender ("" if kept).

        Raises:
            ForbiddenError: ``sender`` may not push this update (``check_update``).
        """
        ...


UpdateSinks = Callable[[str], UpdateSink | None]
"""``sinks(job_id)``: where a pushed update of that job goes (None: no aggregator here)."""


def check_offer_names(offer: m.TensorOffer) -> None:
    """Refuse an offer whose ids or file name could not safely become part of a path."""
    try:
        check_name(offer.transfer_id, "transfer id")
        if offer.job_id:
            check_name(offer.job_id, "job id")
        if offer.name:
            check_name(offer.name, "file name")
    except UnsafeNameError as exc:
        raise ForbiddenError(str(exc)) from exc
    if offer.size < 0 or offer.round < 0 or offer.samples < 0:
        raise ForbiddenError("negative size, round or sample count")


@dataclass(frozen=True, slots=True)
class RoundView:
    """What the parameter server knows of the round an update or request is checked against."""

    number: int
    trainers: Collection[str]
    """The current round plan's trainers."""
    received: Collection[str]
    """Trainers whose update of this round is in or being received."""
    max_samples: int
    """Most samples one update may claim (0: the plan gave no bound)."""
    max_bytes: int
    """Most bytes one encoded update may take (a whole model in fp32, plus headers)."""


def check_update(view: RoundView, offer: m.TensorOffer, sender: str) -> None:
    """Whether ``sender`` may push ``offer`` as its update of the current round.

    A late update (an earlier round) passes here: the caller drops it without pulling.
    """
    if sender not in view.trainers:
        raise ForbiddenError(f"{sender} is not a trainer of round {view.number}'s plan")
    if offer.round > view.number:
        raise ForbiddenError(f"update for round {offer.round}, but round {view.number} is open")
    if offer.round == view.number and sender in view.received:
        raise ForbiddenError(f"{sender} already sent its update of round {view.number}")
    if offer.samples < 1:
        raise ForbiddenError("an update must claim at least one sample")
    if view.max_samples and offer.samples > view.max_samples:
        allowed = view.max_samples
        raise ForbiddenError(f"{offer.samples} samples claimed; round {view.number} allows {allowed}")
    if offer.size > view.max_bytes:
        raise ForbiddenError(f"update of {offer.size} bytes; this model's take at most {view.max_bytes}")


def check_weights_request(view: RoundView, peer: str, scheduler: str) -> None:
    """Whether ``peer`` may be given the job's weights."""
    if peer != scheduler and peer not in view.trainers:
        raise ForbiddenError(f"{peer} is not a trainer of this job's round plan")


def check_job_scheduler(peer: str, scheduler: str, what: str) -> None:
    """Whether ``peer`` may send ``what`` (a round plan, the job's end) for a job ``scheduler`` runs."""
    if peer != scheduler:
        raise ForbiddenError(f"{what} is taken only from the job's scheduler, not {peer}")


def check_weights_push(peer: str, parameter_server: str) -> None:
    """Whether ``peer`` may push weights to a trainer whose task names ``parameter_server``."""
    if not parameter_server or peer != parameter_server:
        raise ForbiddenError(f"weights are taken only from the job's parameter server, not {peer}")


class Membership:
    """Whether a peer belongs to a job, as the job's scheduler says (answers cached briefly).

    Args:
        ask: ``await ask(scheduler, job_id, peer)``: the scheduler's answer
            (``JobMemberRequest``); any ``HyphaError`` counts as "no".
        ttl_seconds: how long an answer is reused.
    """

    def __init__(
        self,
        ask: Callable[[str, str, str], Awaitable[bool]],
        ttl_seconds: float = MEMBERSHIP_TTL_SECONDS,
    ) -> None:
        self._ask = ask
        self._ttl = ttl_seconds
        self._answers: dict[tuple[str, str, str], tuple[bool, float]] = {}

    async def is_member(self, scheduler: str, job_id: str, peer: str) -> bool:
        key = (scheduler, job_id, peer)
        now = trio.current_time()
        cached = self._answers.get(key)
        if cached is not None and now - cached[1] < self._ttl:
            return cached[0]
        try:
            member = await self._ask(scheduler, job_id, peer)
        except HyphaError as exc:
            logger.warning("scheduler %s could not confirm %s in job %s: %s", scheduler, peer, job_id, exc)
            return False
        if len(self._answers) > 10_000:  # bounded: forget everything rather than grow
            self._answers.clear()
        self._answers[key] = (member, now)
        return member

    async def check_file_push(self, peer: str, *, scheduler: str, parameter_server: str, job_id: str) -> None:
        """Whether ``peer`` may push a file to this worker's trainer of ``job_id``."""
        if peer in (scheduler, parameter_server):
            return
        if not await self.is_member(scheduler, job_id, peer):
            raise ForbiddenError(f"{peer} holds no task in job {job_id}")
