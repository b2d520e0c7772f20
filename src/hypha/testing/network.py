"""A whole training network in one trio run, for tests and benchmarks.

Owns starting a gateway, a data node serving one prepared dataset, one parameter-server
worker and N trainer workers (each optionally throttled), all real nodes on 127.0.0.1 in
this process (trainers still run as child processes), and running one job's scheduler on it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from hypha.config.job import JobSpec, load_job
from hypha.config.schema import DataConfig
from hypha.config.toml import write_toml
from hypha.datanode.node import run_data_node
from hypha.local.pki import Pki
from hypha.scheduler.node import run_scheduler
from hypha.testing.cluster import open_test_node, scheduler_config, worker_config
from hypha.worker import run_worker

EXECUTORS: list[dict[str, Any]] = [
    {"class": "train", "name": "diloco", "cmd": sys.executable, "args": ["-m", "hypha.training.trainer"]},
    {"class": "aggregate", "name": "parameter-server", "runtime": "aggregate"},
]


def data_config(pki: Pki, gateway: str, dataset_dir: Path, name: str = "data") -> DataConfig:
    """A data node's config serving ``dataset_dir``, with fresh credentials."""
    tls = pki.node(name, "data")
    return DataConfig(
        cert_pem=tls.cert,
        key_pem=tls.key,
        trust_pem=tls.trust,
        crls_pem=tls.crls,
        gateway_addresses=[gateway],
        relay_circuit=False,
        dataset_path=[dataset_dir],
    )


@asynccontextmanager
async def open_training_network(
    pki: Pki, tmp: Path, dataset_dir: Path, throttles: Sequence[float] = (1.0, 1.0, 1.0)
) -> AsyncIterator[str]:
    """Start the network; yields the gateway's address. Worker 0 is the cheapest (the PS)."""
    async with open_test_node(pki, "gw", "gateway", relay_hop=True) as gw, trio.open_nursery() as nursery:
        addr = gw.listen_addrs()[0]
        data_cfg = data_config(pki, addr, dataset_dir)
        await nursery.start(lambda task_status: run_data_node(data_cfg, task_status=task_status))
        for i, throttle in enumerate([1.0, *throttles]):
            config = worker_config(
                pki,
                f"w{i}",
                addr,
                tmp,
                price=1.0 + i,
                executors=EXECUTORS,
                throttle=throttle,
                kill_grace_seconds=2.0,
            )
            await nursery.start(lambda task_status, c=config: run_worker(c, task_status=task_status))
        yield addr
        nursery.cancel_scope.cancel()


def training_job(
    tmp: Path, name: str, doc: dict[str, Any], num_trainers: int, min_trainers: int | None = None
) -> JobSpec:
    """A job for this network: ``doc`` plus pools for the trainers and the one parameter server.

    Writes ``tmp/NAME.toml`` (results go to ``tmp/runs/NAME``) and loads it like a user's file.
    """
    pool_resources = {"cpu": 1.0, "memory": 1.0}
    full: dict[str, Any] = {
        "name": name,
        "output_dir": str(tmp / "runs" / name),
        "round_deadline_seconds": 60.0,
        "trainers": {
            "min": num_trainers if min_trainers is None else min_trainers,
            "target": num_trainers,
            "grace_seconds": 60.0,
            "resources": pool_resources,
        },
        "parameter_server": {
            "executor": "parameter-server",
            "min": 1,
            "target": 1,
            "resources": pool_resources,
        },
        **doc,
    }
    return load_job(write_toml(tmp / f"{name}.toml", full))


def read_metrics(out: Path) -> list[dict[str, Any]]:
    """The job's metrics.jsonl as a list of dicts."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


async def run_training_job(pki: Pki, addr: str, job: JobSpec, name: str) -> list[dict[str, Any]]:
    """Run ``job`` with a fresh scheduler on the network; return its metrics lines."""
    config = scheduler_config(pki, name, addr, lease_seconds=10.0, offer_deadline_seconds=1.0)
    await run_scheduler(config, job)
    return read_metrics(job.out)
