"""The plan of a local run (``hypha up``): which job, and where its files go.

Owns the built-in demo job, the ``LocalPlan`` (the run's root directory, its job spec and
dataset directory, how many trainers), preparing the built-in dataset (byte-level text of
the Python standard library's own sources) once, and reading the job's ``status.json`` for
the live view. Node configs are ``topology.py``'s; starting nodes is ``launch.py``'s.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypha.config.job import JobSpec, load_job
from hypha.config.toml import write_toml

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
        # The parameter server checkpoints next to the results (every worker is on this machine).
        doc["checkpoint"] = {"store": str(Path(doc["output_dir"]) / "checkpoints"), "every_rounds": 10}
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


def read_status(out: Path) -> dict[str, Any] | None:
    """The job's ``out/status.json``, or None while it is missing or half written (blocking)."""
    try:
        return dict(json.loads((out / "status.json").read_text()))
    except (OSError, ValueError):
        return None


def logs_dir(plan: LocalPlan) -> Path:
    """Where each node of a run logs, one file per node."""
    return plan.root / "network" / "logs"
