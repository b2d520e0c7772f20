"""The nodes of a local run and their configs: a fresh PKI and one TOML file per node.

Owns the local topology: a gateway, a data node serving the plan's dataset, N trainer
workers plus one parameter-server worker, and a scheduler, all on 127.0.0.1 with port 0,
credentials issued by a CA made for this run. Starting them is ``launch.py``'s job.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from hypha.config.toml import write_toml
from hypha.local.pki import Pki
from hypha.local.plan import LocalPlan


def write_configs(plan: LocalPlan) -> dict[str, Path]:
    """A fresh PKI and one config per node under ``plan.root/network``; returns name -> path.

    Whatever an earlier run left in that directory is removed first. Blocking (files and key
    generation): call it before ``trio.run`` or in a thread.
    """
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
