"""``hypha up``: a whole Hypha network on this machine, running one job.

Owns the local topology: a fresh development PKI, the built-in dataset (byte-level text of
the Python standard library's own sources, prepared once), configs for a gateway, a data
node, N trainer workers plus one parameter-server worker and a scheduler, starting them as
one process per role (default) or all in this process (``single_process``), and a live view
of the job drawn from its ``status.json``. Roles are started through their public ``run_*``
functions or their CLI commands, never through their internals.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from hypha.config.job import JobSpec, load_job
from hypha.config.load import load_config
from hypha.testing.cluster import Pki, spawn_node, write_toml

logger = logging.getLogger(__name__)

DEMO_JOB: dict[str, Any] = {
    "name": "demo",
    "dataset": "stdlib-text",
    "rounds": 40,
    "samples_per_round": 1536,
    "batch_size": 16,
    "seed": 0,
    "encoding": "fp16",
    "report_every_seconds": 0.5,
    "sync_horizon_seconds": 1.0,
    "round_deadline_seconds": 60.0,
    "eval_batches": 4,
    "model": {
        "kind": "builtin",
        "name": "gpt",
        "options": {"dim": 64, "num_layers": 2, "num_heads": 4, "seq_len": 64},
    },
    "inner": {"lr": 3e-3, "warmup_steps": 10, "weight_decay": 0.0, "schedule": "cosine"},
    "outer": {"lr": 0.7, "momentum": 0.9},
    "trainers": {
        "executor": "diloco",
        "min": 1,
        "target": 3,
        "grace_seconds": 60.0,
        "bid": 1.0,
        "max_price": 5.0,
        "resources": {"cpu": 1.0, "memory": 1.0},
    },
    "parameter_server": {
        "executor": "parameter-server",
        "min": 1,
        "target": 1,
        "grace_seconds": 60.0,
        "bid": 1.0,
        "max_price": 5.0,
        "resources": {"cpu": 1.0, "memory": 1.0},
    },
}


@dataclass(frozen=True)
class LocalPlan:
    """Where everything of a local run lives."""

    root: Path
    job_path: Path
    job: JobSpec
    dataset_dir: Path
    num_trainers: int

    @property
    def out(self) -> Path:
        return self.job.out


def ensure_dataset(dataset_dir: Path, progress: Callable[[int, int], None] | None = None) -> None:
    """Prepare the built-in dataset into ``dataset_dir`` unless it is already there."""
    from hypha.data.manifest import load_manifest
    from hypha.data.prepare import prepare_builtin

    try:
        load_manifest(dataset_dir)
        return
    except Exception:  # missing or broken: (re)prepare it
        pass
    prepare_builtin(
        dataset_dir, name="stdlib-text", max_samples=16384, seq_len=64, slice_samples=512, progress=progress
    )


def make_plan(root: Path, job_path: Path | None, num_trainers: int, rounds: int | None) -> LocalPlan:
    """Where a local run's files go; the demo job unless ``job_path`` names another."""
    root = root.resolve()  # configs name files relative to themselves: keep paths absolute
    root.mkdir(parents=True, exist_ok=True)
    if job_path is None:
        doc = json.loads(json.dumps(DEMO_JOB))
        doc["trainers"]["target"] = num_trainers
        doc["output_dir"] = str(Path("runs").resolve() / doc["name"])
        if rounds is not None:
            doc["rounds"] = rounds
        job_path = write_toml(root / "job.toml", doc)
    job = load_job(job_path)
    if job.output_dir is None:
        job = JobSpec(**{**job.__dict__, "output_dir": Path("runs").resolve() / job.name})
    return LocalPlan(
        root=root,
        job_path=job_path,
        job=job,
        dataset_dir=root / "datasets" / job.dataset,
        num_trainers=job.trainers.target,
    )


def write_configs(plan: LocalPlan) -> dict[str, Path]:
    """A fresh PKI and one config per node; returns name -> config path."""
    import shutil

    net = plan.root / "network"
    shutil.rmtree(net, ignore_errors=True)
    net.mkdir(parents=True)
    pki = Pki.create(net / "pki", org="Hypha local")
    configs: dict[str, Path] = {}
    configs["gateway"] = write_toml(
        net / "gateway.toml",
        {**pki.config_keys(pki.node("gateway", "gateway")), "listen_addresses": ["/ip4/127.0.0.1/tcp/0"]},
    )
    configs["data"] = write_toml(
        net / "data.toml",
        {**pki.config_keys(pki.node("data", "data")), "dataset_path": [str(plan.dataset_dir)]},
    )
    configs["scheduler"] = write_toml(
        net / "scheduler.toml",
        {
            **pki.config_keys(pki.node("scheduler", "scheduler")),
            "lease_seconds": 10.0,
            "offer_deadline_seconds": 1.5,
            "state_dir": str(net / "state"),
        },
    )
    executors = [
        {
            "class": "train",
            "name": plan.job.trainers.executor,
            "runtime": "process",
            "cmd": sys.executable,
            "args": ["-m", "hypha.training.trainer"],
        },
        {"class": "aggregate", "name": plan.job.parameter_server.executor, "runtime": "aggregate"},
    ]
    for i in range(plan.num_trainers + 1):
        name = f"worker{i}"
        configs[name] = write_toml(
            net / f"{name}.toml",
            {
                **pki.config_keys(pki.node(name, "worker")),
                "work_dir": str(net / "work" / name),
                "resources": {"cpu": 1.0, "memory": 2.0},
                "offer": {"price": 1.0 + 0.1 * i, "floor": 0.1},
                "executors": executors,
            },
        )
    return configs


def _with_gateway(path: Path, gateway: str) -> list[str]:
    return ["--config", str(path), "--gateway", gateway]


@asynccontextmanager
async def start_processes(plan: LocalPlan, configs: dict[str, Path]) -> AsyncIterator[trio.Process]:
    """One process per role; yields the scheduler's process."""
    logs = plan.root / "network" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    async with AsyncExitStack() as stack:
        gw = await stack.enter_async_context(
            spawn_node(["gateway", "--config", str(configs["gateway"])], logs, "gateway")
        )
        await stack.enter_async_context(
            spawn_node(["data", *_with_gateway(configs["data"], gw.address)], logs, "data")
        )
        for name in sorted(k for k in configs if k.startswith("worker")):
            await stack.enter_async_context(
                spawn_node(["worker", *_with_gateway(configs[name], gw.address)], logs, name)
            )
        scheduler = await stack.enter_async_context(
            spawn_node(
                ["scheduler", "--job", str(plan.job_path), *_with_gateway(configs["scheduler"], gw.address)],
                logs,
                "scheduler",
            )
        )
        yield scheduler.process


async def run_single_process(plan: LocalPlan, configs: dict[str, Path]) -> None:
    """Every role in this trio run (trainers are still child processes)."""
    from hypha.config.schema import DataConfig, GatewayConfig, SchedulerConfig, WorkerConfig
    from hypha.datanode.node import run_data_node
    from hypha.gateway import run_gateway
    from hypha.scheduler.node import run_scheduler
    from hypha.worker import run_worker

    async with trio.open_nursery() as nursery:
        gw_config = load_config("gateway", configs["gateway"])
        assert isinstance(gw_config, GatewayConfig)
        gw = await nursery.start(lambda task_status: run_gateway(gw_config, task_status=task_status))
        address = gw.listen_addrs()[0]
        data_config = load_config("data", configs["data"], overrides={"gateway_addresses": [address]})
        assert isinstance(data_config, DataConfig)
        await nursery.start(lambda task_status: run_data_node(data_config, task_status=task_status))
        for name in sorted(k for k in configs if k.startswith("worker")):
            config = load_config("worker", configs[name], overrides={"gateway_addresses": [address]})
            assert isinstance(config, WorkerConfig)
            await nursery.start(lambda task_status, c=config: run_worker(c, task_status=task_status))
        sched = load_config("scheduler", configs["scheduler"], overrides={"gateway_addresses": [address]})
        assert isinstance(sched, SchedulerConfig)
        await run_scheduler(sched, plan.job)
        nursery.cancel_scope.cancel()


def read_status(out: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads((out / "status.json").read_text()))
    except (OSError, ValueError):
        return None


def logs_dir(plan: LocalPlan) -> Path:
    return plan.root / "network" / "logs"
