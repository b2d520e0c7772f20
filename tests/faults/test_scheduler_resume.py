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
from typing import Any

import pytest
import trio

from hypha.config.job import JobSpec
from hypha.testing.cluster import Pki, spawn_node, write_toml
from hypha.testing.network import training_job
from hypha.testing.processes import open_process_network, wait_rounds

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

TINY = {"dim": 32, "num_layers": 1, "num_heads": 2, "seq_len": 32}
ROUNDS = 8
EVERY = 2
KILL_AFTER_ROUND = 3


def dataset(tmp: Path) -> Path:
    from hypha.data.prepare import prepare_builtin

    out = tmp / "tiny-text"
    prepare_builtin(out, name="tiny-text", max_samples=2440, seq_len=32, slice_samples=40)
    return out


def job_spec(tmp: Path) -> JobSpec:
    doc: dict[str, Any] = {
        "dataset": "tiny-text",
        "rounds": ROUNDS,
        "samples_per_round": 256,
        "batch_size": 8,
        "fixed_inner_steps": 16,
        "report_every_seconds": 0.1,
        "eval_batches": 2,
        "model": {
            "kind": "builtin",
            "name": "gpt",
            "options": {"dim": 32, "num_layers": 1, "num_heads": 2, "seq_len": 32},
        },
        "inner": {"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.0, "schedule": "constant"},
        "checkpoint": {"store": str(tmp / "checkpoints"), "every_rounds": EVERY},
    }
    return training_job(tmp, "resumable", doc, num_trainers=2, min_trainers=1)


def saved_job_id(state_dir: Path) -> str:
    with sqlite3.connect(state_dir / "scheduler.sqlite") as db:
        return str(db.execute("SELECT job_id FROM jobs WHERE name = 'resumable'").fetchone()[0])


async def test_a_killed_scheduler_resumes_its_job(pki: Pki, tmp_path: Path) -> None:
    job = job_spec(tmp_path)
    job_file = tmp_path / "resumable.toml"  # written by training_job
    state_dir = tmp_path / "state"
    async with open_process_network(pki, tmp_path, dataset(tmp_path), num_workers=4) as (addr, _workers):
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
