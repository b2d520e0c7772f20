"""A training network whose workers are real child processes, for fault tests and benchmarks.

Owns starting a gateway and a data node in this process and N ``hypha worker`` processes
(each with the trainer and parameter-server executors), so that a worker can be SIGKILLed as
a crash would; and the fault injections that are driven by the job's own ``status.json``
(an event: the rounds closed), never by a timer; and the small job and dataset they run.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from hypha.config.job import JobSpec
from hypha.datanode.node import run_data_node
from hypha.local.children import ChildNode
from hypha.local.pki import Pki
from hypha.local.plan import read_status
from hypha.testing.cluster import open_test_node, spawn_node, write_toml
from hypha.testing.network import EXECUTORS, data_config, training_job

POLL_SECONDS = 0.05
"""How often ``status.json`` is read while waiting for a round (the caller sets the deadline)."""

TINY_GPT = {"dim": 32, "num_layers": 1, "num_heads": 2, "seq_len": 32}


def tiny_dataset(tmp: Path) -> Path:
    """A small built-in text dataset (60 slices of 40 samples) under ``tmp/tiny-text``."""
    from hypha.data.prepare import prepare_builtin

    out = tmp / "tiny-text"
    prepare_builtin(out, name="tiny-text", max_samples=2440, seq_len=32, slice_samples=40)
    return out


def fault_job(
    tmp: Path, name: str, *, rounds: int, every_rounds: int, eval_batches: int = 2, seed: int = 0
) -> JobSpec:
    """A short fixed-H job of the tiny GPT on ``tiny_dataset``, 2 trainers (min 1), checkpoints on."""
    doc: dict[str, Any] = {
        "dataset": "tiny-text",
        "rounds": rounds,
        "samples_per_round": 256,
        "batch_size": 8,
        "fixed_inner_steps": 16,
        "report_every_seconds": 0.1,
        "eval_batches": eval_batches,
        "seed": seed,
        "model": {"kind": "builtin", "name": "gpt", "options": TINY_GPT},
        "inner": {"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.0, "schedule": "constant"},
        "checkpoint": {"store": str(tmp / "checkpoints" / name), "every_rounds": every_rounds},
    }
    return training_job(tmp, name, doc, num_trainers=2, min_trainers=1)


@asynccontextmanager
async def open_process_network(
    pki: Pki, tmp: Path, dataset_dir: Path, num_workers: int
) -> AsyncIterator[tuple[str, dict[str, ChildNode]]]:
    """A gateway, a data node and ``num_workers`` worker processes (worker i asks price 1 + i).

    Yields the gateway's address and the workers by peer id.
    """
    async with (
        open_test_node(pki, "gw", "gateway", relay_hop=True) as gw,
        trio.open_nursery() as nursery,
        AsyncExitStack() as stack,
    ):
        addr = gw.listen_addrs()[0]
        data_cfg = data_config(pki, addr, dataset_dir)
        await nursery.start(lambda task_status: run_data_node(data_cfg, task_status=task_status))
        workers: dict[str, ChildNode] = {}
        for i in range(num_workers):
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


async def wait_rounds(job: JobSpec, rounds: int) -> dict[str, object]:
    """The job's status once ``rounds`` rounds have closed (poll under the caller's deadline)."""
    while True:
        status = await trio.to_thread.run_sync(read_status, job.out)
        if status is not None and int(status["round"]) >= rounds:
            return status
        await trio.sleep(POLL_SECONDS)


async def kill_parameter_server_after(job: JobSpec, workers: dict[str, ChildNode], rounds: int) -> str:
    """SIGKILL the parameter server's worker once ``rounds`` rounds have closed; return its peer."""
    while True:
        status = await wait_rounds(job, rounds)
        victim = workers.get(str(status["parameter_server"]))
        if victim is not None:
            victim.kill()
            return victim.peer_id
        await trio.sleep(POLL_SECONDS)


async def kill_trainer_after(job: JobSpec, workers: dict[str, ChildNode], rounds: int) -> str:
    """SIGKILL one trainer's worker once ``rounds`` rounds have closed; return its peer."""
    while True:
        status = await wait_rounds(job, rounds)
        trainers = [str(t) for t in status["trainers"]]  # type: ignore[attr-defined]
        victim = next((workers[t] for t in trainers if t in workers), None)
        if victim is not None:
            victim.kill()
            return victim.peer_id
        await trio.sleep(POLL_SECONDS)
