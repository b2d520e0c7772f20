"""The task documents a job sends with each dispatch: what a trainer and the parameter server run.

Pure functions of the job's state (spec, job id, dataset, parameter server): no I/O, no
network. The documents themselves are wire types in ``protocol/tasks.py``.
"""

from __future__ import annotations

from hypha.config.job import JobSpec
from hypha.data.manifest import Manifest
from hypha.protocol.tasks import AggregateTask, InnerDoc, ModelDoc, OuterDoc, TrainTask
from hypha.scheduler.state import DatasetRef


def model_doc(spec: JobSpec) -> ModelDoc:
    model = spec.model
    return ModelDoc(
        kind=model.kind,
        name=model.name,
        path=str(model.path) if model.path else None,
        options=dict(model.options),
    )


def train_task(spec: JobSpec, job_id: str, parameter_server: str) -> TrainTask:
    """A trainer's document: model, data, inner optimizer, and where its updates go."""
    per_trainer = spec.samples_per_round // (spec.batch_size * max(1, spec.trainers.target))
    total_steps = max(1, spec.rounds * (spec.fixed_inner_steps or per_trainer))
    inner = spec.inner
    return TrainTask(
        job_id=job_id,
        model=model_doc(spec),
        dataset=spec.dataset,
        batch_size=spec.batch_size,
        seed=spec.seed,
        inner=InnerDoc(
            lr=inner.lr,
            beta1=inner.beta1,
            beta2=inner.beta2,
            weight_decay=inner.weight_decay,
            warmup_steps=inner.warmup_steps,
            schedule=inner.schedule,
            total_steps=total_steps,
        ),
        encoding=spec.encoding,
        report_every_seconds=spec.report_every_seconds,
        parameter_server=parameter_server,
        batches_per_round=spec.fixed_inner_steps,
    )


def aggregate_task(
    spec: JobSpec, job_id: str, scheduler: str, dataset: DatasetRef, manifest: Manifest
) -> AggregateTask:
    """The parameter server's document: model, outer optimizer, rounds, held-out slice."""
    eval_sha = manifest.slices[dataset.eval_index].sha256 if dataset.eval_index is not None else ""
    return AggregateTask(
        job_id=job_id,
        model=model_doc(spec),
        seed=spec.seed,
        outer=OuterDoc(lr=spec.outer.lr, momentum=spec.outer.momentum),
        rounds=spec.rounds,
        encoding=spec.encoding,
        scheduler=scheduler,
        min_updates=spec.trainers.min,
        round_deadline_seconds=spec.round_deadline_seconds,
        dataset=spec.dataset,
        eval_batches=spec.eval_batches,
        batch_size=spec.batch_size,
        eval_index=dataset.eval_index,
        eval_sha256=eval_sha,
        providers=list(dataset.providers),
    )
