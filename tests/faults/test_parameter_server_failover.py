"""Parameter-server failover: its worker process is SIGKILLed mid-job and the job completes.

Real processes: four workers are child processes (``hypha worker``), so one can be killed as
a crash would; the gateway, the data node and the scheduler are real nodes in this process.
The same job runs twice on the network, first undisturbed, then with the parameter server's
worker killed once a given round has closed (an event: the job's ``status.json``, never a
timer). The second run must finish every round from the newest checkpoint, redo at most the
checkpoint interval, and end within 10% of the undisturbed run's held-out loss.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from hypha.config.job import JobSpec
from hypha.datanode.node import run_data_node
from hypha.local.children import ChildNode
from hypha.local.plan import read_status
from hypha.testing.cluster import Pki, open_test_node, spawn_node, write_toml
from hypha.testing.network import EXECUTORS, data_config, run_training_job, training_job

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


@asynccontextmanager
async def network(pki: Pki, tmp: Path) -> AsyncIterator[tuple[str, dict[str, ChildNode]]]:
    """A gateway, a data node and four worker processes; yields the gateway and workers by peer."""
    ds = dataset(tmp)
    async with (
        open_test_node(pki, "gw", "gateway", relay_hop=True) as gw,
        trio.open_nursery() as nursery,
        AsyncExitStack() as stack,
    ):
        addr = gw.listen_addrs()[0]
        data_cfg = data_config(pki, addr, ds)
        await nursery.start(lambda task_status: run_data_node(data_cfg, task_status=task_status))
        workers: dict[str, ChildNode] = {}
        for i in range(4):
            name = f"w{i}"
            cfg = write_toml(
                tmp / f"{name}.toml",
                {
                    **pki.config_keys(pki.node(name, "worker")),
                    "gateway_addresses": [addr],
                    "relay_circuit": False,
                    "work_dir": str(tmp / name),
                    "resources": {"cpu": 1.0, "memory": 4.0, "storage": 10.0},
                    "offer": {"price": 1.0 + i, "floor": 0.1},
                    "executors": EXECUTORS,
                    "kill_grace_seconds": 2.0,
                },
            )
            child = await stack.enter_async_context(spawn_node(["worker", "--config", str(cfg)], tmp, name))
            workers[child.peer_id] = child
        yield addr, workers
        nursery.cancel_scope.cancel()


def global_losses(out: Path) -> dict[int, float]:
    """The held-out loss of each closed round (a redone round: its last value)."""
    losses: dict[int, float] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        doc = json.loads(line)
        if doc["worker"] == "global" and doc.get("loss") is not None:
            losses[doc["round"]] = doc["loss"]
    return losses


async def kill_parameter_server_after(job: JobSpec, workers: dict[str, ChildNode], rounds: int) -> str:
    """SIGKILL the parameter server's worker once ``rounds`` rounds have closed; return its peer."""
    while True:
        status = await trio.to_thread.run_sync(read_status, job.out)
        if status is not None and status["round"] >= rounds and status["parameter_server"] in workers:
            victim = workers[status["parameter_server"]]
            victim.kill()
            return victim.peer_id
        await trio.sleep(0.05)  # polling status.json under the caller's deadline


async def test_job_completes_after_its_parameter_server_is_killed(pki: Pki, tmp_path: Path) -> None:
    async with network(pki, tmp_path) as (addr, workers):
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
