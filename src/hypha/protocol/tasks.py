"""Task documents: the JSON a scheduler dispatches with ``DispatchTask.config``.

Owns the typed shape of what a trainer (``TrainTask``) and the parameter server
(``AggregateTask``) are told to do. The worker stores the bytes as ``job.json`` in the task's
work directory and serves them verbatim on the bridge's ``GET /job``.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from hypha.protocol.messages import Encoding


class ModelDoc(msgspec.Struct, frozen=True, kw_only=True):
    kind: Literal["builtin", "hf"] = "builtin"
    name: str = "gpt"
    path: str | None = None
    options: dict[str, float] = msgspec.field(default_factory=dict)


class InnerDoc(msgspec.Struct, frozen=True, kw_only=True):
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    warmup_steps: int = 10
    schedule: Literal["cosine", "constant"] = "cosine"
    total_steps: int = 1000


class OuterDoc(msgspec.Struct, frozen=True, kw_only=True):
    lr: float = 0.7
    momentum: float = 0.9


class CheckpointDoc(msgspec.Struct, frozen=True, kw_only=True):
    """Where the parameter server checkpoints (``hypha.checkpoint.open_store``'s arguments)."""

    store: str
    every_rounds: int = 5
    keep_last_n: int = 3
    compress: Literal["none", "zstd"] = "none"
    endpoint_url: str | None = None
    region: str | None = None


class TrainTask(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="train"):
    """What a trainer runs (``python -m hypha.training.trainer``)."""

    job_id: str
    model: ModelDoc
    dataset: str
    batch_size: int
    seed: int
    inner: InnerDoc
    encoding: Encoding = "fp32"
    report_every_seconds: float = 0.25
    parameter_server: str = ""
    throttle: float = 1.0
    """Test knob: sleep (throttle - 1) x compute time after each batch (1.0 = full speed)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batches_per_round: int | None = None
    """Fixed-H mode: sync after exactly this many batches each round; no sync is planned."""


class AggregateTask(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="aggregate"):
    """What the parameter server runs (in the worker)."""

    job_id: str
    model: ModelDoc
    seed: int
    outer: OuterDoc
    rounds: int
    encoding: Encoding = "fp32"
    scheduler: str = ""
    min_updates: int = 1
    round_deadline_seconds: float = 120.0
    dataset: str = ""
    eval_batches: int = 4
    batch_size: int = 16
    eval_index: int | None = None
    """Held-out slice the parameter server evaluates the global model on after each round."""
    eval_sha256: str = ""
    providers: list[str] = msgspec.field(default_factory=list)
    checkpoint: CheckpointDoc | None = None
    """Checkpoints, and where a restarted server resumes from (the newest of this job)."""


TaskDoc = TrainTask | AggregateTask
