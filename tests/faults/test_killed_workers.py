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
from pathlib import Path
from typing import Any

import pytest
import trio

from hypha.config.job import JobSpec
from hypha.testing.cluster import Pki
from hypha.testing.network import run_training_job, training_job
from hypha.testing.processes import kill_parameter_server_after, kill_trainer_after, open_process_network

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

TINY = {"dim": 32, "num_layers": 1, "num_heads": 2, "seq_len": 32}
ROUNDS = 8
EVERY = 2
KILL_AFTER_ROUND = 3
"""The parameter server dies once this many rounds have closed (its newest checkpoint: round 2)."""


def dataset(tmp: Path) -> Path:
    from hypha.data.prepare import prepare_builtin

    out = tmp / "tiny-text"
    prepare_builtin(out, name="tiny-text", max_samples=2440, seq_len=32, slice_samples=40)
    return out


def job_spec(tmp: Path, name: str) -> JobSpec:
    doc: dict[str, Any] = {
        "dataset": "tiny-text",
        "rounds": ROUNDS,
        "samples_per_round": 256,
        "batch_size": 8,
        "fixed_inner_steps": 16,
        "report_every_seconds": 0.1,
        "eval_batches": 4,
        "seed": 3,
        "model": {"kind": "builtin", "name": "gpt", "options": TINY},
        "inner": {"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.0, "schedule": "constant"},
        "checkpoint": {"store": str(tmp / "checkpoints" / name), "every_rounds": EVERY},
    }
    return training_job(tmp, name, doc, num_trainers=2, min_trainers=1)


def global_losses(out: Path) -> dict[int, float]:
    """The held-out loss of each closed round (a redone round: its last value)."""
    losses: dict[int, float] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        doc = json.loads(line)
        if doc["worker"] == "global" and doc.get("loss") is not None:
            losses[doc["round"]] = doc["loss"]
    return losses


async def test_job_completes_after_its_parameter_server_is_killed(pki: Pki, tmp_path: Path) -> None:
    async with open_process_network(pki, tmp_path, dataset(tmp_path), num_workers=4) as (addr, workers):
        calm = job_spec(tmp_path, "calm")
        with trio.fail_after(240):
            await run_training_job(pki, addr, calm, "sched-calm")
        stormy = job_spec(tmp_path, "stormy")
        killed: list[str] = []
        with trio.fail_after(300):
            async with trio.open_nursery() as nursery:

                async def kill() -> None:
                    killed.append(await kill_parameter_server_after(stormy, workers, KILL_AFTER_ROUND))

                nursery.start_soon(kill)
                await run_training_job(pki, addr, stormy, "sched-stormy")
    assert killed, "the parameter server was never killed"
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
    async with open_process_network(pki, tmp_path, dataset(tmp_path), num_workers=4) as (addr, workers):
        calm = job_spec(tmp_path, "calm")
        with trio.fail_after(240):
            await run_training_job(pki, addr, calm, "sched-calm")
        stormy = job_spec(tmp_path, "stormy")
        killed: list[str] = []
        with trio.fail_after(300):
            async with trio.open_nursery() as nursery:

                async def kill() -> None:
                    killed.append(await kill_trainer_after(stormy, workers, KILL_AFTER_ROUND))

                nursery.start_soon(kill)
                await run_training_job(pki, addr, stormy, "sched-stormy")
    assert killed, "no trainer was killed"
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
