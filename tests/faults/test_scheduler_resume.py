"""Scheduler resume: the scheduler process is SIGKILLed mid-job and ``--resume`` finishes the job.

Real processes: the scheduler and four workers are child processes (``hypha scheduler``,
``hypha worker``); the gateway and the data node are real nodes in this process. The
scheduler keeps its job state in SQLite under ``state_dir``; it is killed once 3 of 8 rounds
have closed (read from ``status.json``), started again with ``--resume`` and the same
identity, and must finish every round of the same job (same job id), going on from the
parameter server's newest checkpoint rather than from round 0.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import trio

from hypha.config.job import JobSpec
from hypha.testing.cluster import Pki, spawn_node, write_toml
from hypha.testing.processes import fault_job, open_process_network, tiny_dataset, wait_rounds

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

ROUNDS = 8
EVERY = 2
KILL_AFTER_ROUND = 3


def job_spec(tmp: Path) -> JobSpec:
    return fault_job(tmp, "resumable", rounds=ROUNDS, every_rounds=EVERY)


def saved_job_id(state_dir: Path) -> str:
    with sqlite3.connect(state_dir / "scheduler.sqlite") as db:
        return str(db.execute("SELECT job_id FROM jobs WHERE name = 'resumable'").fetchone()[0])


async def test_a_killed_scheduler_resumes_its_job(pki: Pki, tmp_path: Path) -> None:
    job = job_spec(tmp_path)
    job_file = tmp_path / "resumable.toml"  # written by training_job
    state_dir = tmp_path / "state"
    async with open_process_network(pki, tmp_path, tiny_dataset(tmp_path), num_workers=4) as (addr, _workers):
        cfg = write_toml(
            tmp_path / "sched.toml",
            {
                **pki.config_keys(pki.node("sched", "scheduler")),
                "gateway_addresses": [addr],
                "relay_circuit": False,
                "lease_seconds": 10.0,
                "offer_deadline_seconds": 1.0,
                "state_dir": str(state_dir),
            },
        )
        args = ["scheduler", "--config", str(cfg), "--job", str(job_file)]
        with trio.fail_after(120):
            async with spawn_node(args, tmp_path, "sched") as first:
                before = await wait_rounds(job, KILL_AFTER_ROUND)
                first.kill()
                await first.process.wait()
        job_id = saved_job_id(state_dir)
        assert job_id == before["job_id"]
        with trio.fail_after(240):
            async with spawn_node([*args, "--resume"], tmp_path, "sched-2") as second:
                code = await second.process.wait()
        log = second.log()
    assert code == 0, log[-3000:]
    assert f"resuming job resumable ({job_id})" in log
    status = json.loads((job.out / "status.json").read_text())
    assert status["state"] == "done"
    assert status["job_id"] == job_id
    assert status["round"] == ROUNDS
    assert (job.out / "model.safetensors").stat().st_size > 0
    lines = [json.loads(line) for line in (job.out / "metrics.jsonl").read_text().splitlines()]
    closed = [line["round"] for line in lines if line["worker"] == "global"]
    assert sorted(set(closed)) == list(range(ROUNDS))  # every round, the ones before the kill kept
    assert len(closed) - ROUNDS <= EVERY + 1  # redone: at most since the newest checkpoint
