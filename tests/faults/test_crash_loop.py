"""Crash loops end: a trainer that fails the same way every time fails the job, with its error.

Real nodes (gateway, data node, three workers, the scheduler) on 127.0.0.1; the trainer
executor is a real program that prints an error and exits 3 as soon as it starts, as a job
with a broken setting would. Before, the scheduler let the worker go and leased it again,
forever; now the job fails after ``max_task_failures`` failures with that error, which the
user sees in the scheduler's error and in ``status.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import trio

from hypha.datanode.node import run_data_node
from hypha.errors import JobError, first_hypha_error
from hypha.scheduler.node import run_scheduler
from hypha.testing.cluster import Pki, open_test_node, scheduler_config, worker_config
from hypha.testing.network import data_config, training_job
from hypha.worker import run_worker

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

LIMIT = 3
ERROR = "ValueError: warmup_steps must be in [0, 4], got 10"


async def test_a_trainer_that_always_crashes_fails_the_job_with_its_error(pki: Pki, tmp_path: Path) -> None:
    from hypha.data.prepare import prepare_builtin

    ds = tmp_path / "tiny-text"
    prepare_builtin(ds, name="tiny-text", max_samples=400, seq_len=32, slice_samples=40)
    crash = tmp_path / "crash.py"
    crash.write_text(f"import sys\nprint({ERROR!r}, file=sys.stderr)\nsys.exit(3)\n")
    executors = [
        {"class": "train", "name": "diloco", "cmd": sys.executable, "args": [str(crash)]},
        {"class": "aggregate", "name": "parameter-server", "runtime": "aggregate"},
    ]
    doc = {
        "dataset": "tiny-text",
        "rounds": 3,
        "samples_per_round": 64,
        "batch_size": 8,
        "model": {"kind": "builtin", "name": "gpt", "options": {"dim": 16, "num_layers": 1, "seq_len": 32}},
        "inner": {"warmup_steps": 0},
    }
    job = training_job(tmp_path, "crashing", doc, num_trainers=2, min_trainers=1)
    job = type(job)(
        **{
            **job.__dict__,
            "trainers": type(job.trainers)(**{**job.trainers.__dict__, "max_task_failures": LIMIT}),
        }
    )
    async with open_test_node(pki, "gw", "gateway", relay_hop=True) as gw, trio.open_nursery() as nursery:
        addr = gw.listen_addrs()[0]
        data_cfg = data_config(pki, addr, ds)
        await nursery.start(lambda task_status: run_data_node(data_cfg, task_status=task_status))
        for i in range(3):
            cfg = worker_config(pki, f"w{i}", addr, tmp_path, price=1.0 + i, executors=executors)
            await nursery.start(lambda task_status, c=cfg: run_worker(c, task_status=task_status))
        config = scheduler_config(pki, "sched", addr, lease_seconds=10.0, offer_deadline_seconds=1.0)
        with trio.fail_after(180), pytest.raises((JobError, BaseExceptionGroup)) as failed:
            await run_scheduler(config, job)
        nursery.cancel_scope.cancel()
    error = first_hypha_error(failed.value)  # the scheduler's nurseries may wrap it in a group
    assert isinstance(error, JobError), failed.value
    message = str(error)
    assert f"failed {LIMIT} times" in message
    assert ERROR in message
    status = json.loads((job.out / "status.json").read_text())
    assert status["state"] == "failed"
    assert ERROR in status["error"]
