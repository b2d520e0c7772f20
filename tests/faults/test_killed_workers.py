"""Killed workers: a trainer's or the parameter server's worker process is SIGKILLed mid-job.

Real processes: four workers are child processes (``hypha worker``,
``hypha.testing.processes``), so one can be killed as a crash would; the gateway, the data
node and the scheduler are real nodes in this process.
Each test runs the same job twice on its network, first undisturbed, then with a worker killed
once a given round has closed (an event: the job's ``status.json``, never a timer). The second
run must finish every round (from the newest checkpoint, redoing at most its interval, when
the parameter server died; with a replacement trainer when a trainer died) and end within 10%
of the undisturbed run's held-out loss.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from hypha.config.job import JobSpec
from hypha.local.children import ChildNode
from hypha.testing.cluster import Pki
from hypha.testing.network import run_training_job
from hypha.testing.processes import (
    fault_job,
    kill_parameter_server_after,
    kill_trainer_after,
    open_process_network,
    tiny_dataset,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

Kill = Callable[[JobSpec, dict[str, ChildNode], int], Awaitable[str]]

ROUNDS = 8
EVERY = 2
KILL_AFTER_ROUND = 3
"""A worker dies once this many rounds have closed (the newest checkpoint then: round 2)."""


def job_spec(tmp: Path, name: str) -> JobSpec:
    return fault_job(tmp, name, rounds=ROUNDS, every_rounds=EVERY, eval_batches=4, seed=3)


def global_losses(out: Path) -> dict[int, float]:
    """The held-out loss of each closed round (a redone round: its last value)."""
    losses: dict[int, float] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        doc = json.loads(line)
        if doc["worker"] == "global" and doc.get("loss") is not None:
            losses[doc["round"]] = doc["loss"]
    return losses


async def calm_and_stormy(pki: Pki, tmp_path: Path, kill: Kill) -> tuple[JobSpec, JobSpec, str]:
    """Run the job undisturbed, then again with ``kill`` (returns the killed worker's peer)."""
    async with open_process_network(pki, tmp_path, tiny_dataset(tmp_path), num_workers=4) as (addr, workers):
        calm = job_spec(tmp_path, "calm")
        with trio.fail_after(240):
            await run_training_job(pki, addr, calm, "sched-calm")
        stormy = job_spec(tmp_path, "stormy")
        killed: list[str] = []
        with trio.fail_after(300):
            async with trio.open_nursery() as nursery:

                async def inject() -> None:
                    killed.append(await kill(stormy, workers, KILL_AFTER_ROUND))

                nursery.start_soon(inject)
                await run_training_job(pki, addr, stormy, "sched-stormy")
    assert killed, "the fault was never injected"
    return calm, stormy, killed[0]


async def test_job_completes_after_its_parameter_server_is_killed(pki: Pki, tmp_path: Path) -> None:
    calm, stormy, victim = await calm_and_stormy(pki, tmp_path, kill_parameter_server_after)
    killed = [victim]
    status = json.loads((stormy.out / "status.json").read_text())
    assert status["state"] == "done"
    assert status["round"] == ROUNDS
    assert status["parameter_server"] != killed[0]  # a replacement finished the job
    assert (stormy.out / "model.safetensors").stat().st_size > 0
    events = [json.loads(line) for line in (stormy.out / "events.jsonl").read_text().splitlines()]
    assert [e["worker"] for e in events if e.get("event") == "parameter_server_lost"] == [killed[0]]
    # Rounds redone: from the newest checkpoint (a multiple of EVERY at or before the kill).
    stormy_lines = [json.loads(line) for line in (stormy.out / "metrics.jsonl").read_text().splitlines()]
    closed = [line["round"] for line in stormy_lines if line["worker"] == "global"]
    assert sorted(set(closed)) == list(range(ROUNDS))
    assert len(closed) - ROUNDS <= EVERY + 1
    calm_loss, stormy_loss = global_losses(calm.out)[ROUNDS - 1], global_losses(stormy.out)[ROUNDS - 1]
    assert abs(stormy_loss - calm_loss) <= 0.1 * calm_loss, (calm_loss, stormy_loss)


async def test_job_completes_after_a_trainer_is_killed(pki: Pki, tmp_path: Path) -> None:
    calm, stormy, victim = await calm_and_stormy(pki, tmp_path, kill_trainer_after)
    killed = [victim]
    status = json.loads((stormy.out / "status.json").read_text())
    assert status["state"] == "done"
    assert status["round"] == ROUNDS
    assert killed[0] not in status["trainers"]
    events = [json.loads(line) for line in (stormy.out / "events.jsonl").read_text().splitlines()]
    assert killed[0] in [e["worker"] for e in events if e.get("event") == "lost"]
    # A replacement trained: a worker that is neither the killed one nor the parameter server
    # reported batches after the kill's round.
    lines = [json.loads(line) for line in (stormy.out / "metrics.jsonl").read_text().splitlines()]
    late = {
        line["worker"] for line in lines if line["worker"] != "global" and line["round"] >= KILL_AFTER_ROUND
    }
    assert late - {killed[0], status["parameter_server"]}
    closed = [line["round"] for line in lines if line["worker"] == "global"]
    assert closed == list(range(ROUNDS))  # no round redone: the parameter server kept its state
    calm_loss, stormy_loss = global_losses(calm.out)[ROUNDS - 1], global_losses(stormy.out)[ROUNDS - 1]
    assert abs(stormy_loss - calm_loss) <= 0.1 * calm_loss, (calm_loss, stormy_loss)
