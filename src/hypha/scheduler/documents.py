"""The task documents a job sends with each dispatch: what a trainer and the parameter server run.

Pure functions of the job's state (spec, job id, dataset, parameter server): no network.
The documents themselves are wire types in ``protocol/tasks.py``. ``check_job`` builds the
model those documents name on the meta device, so a job whose trainers could not build it
is refused by ``hypha job validate`` and at the scheduler's start, not at run time.
"""

from __future__ import annotations

from pathlib import Path

from hypha.config.job import JobSpec
from hypha.data.manifest import Manifest
from hypha.errors import ConfigError
from hypha.protocol.tasks import AggregateTask, CheckpointDoc, InnerDoc, ModelDoc, OuterDoc, TrainTask
from hypha.scheduler.state import DatasetRef


def model_doc(spec: JobSpec) -> ModelDoc:
    model = spec.model
    return ModelDoc(
        kind=model.kind,
        name=model.name,
        path=str(model.path) if model.path else None,
        options=dict(model.options),
    )


def check_job(spec: JobSpec, where: str) -> int:
    """Check that trainers and the parameter server can build the job's model; return its size.

    The spec's own ranges (and the warmup against the inner steps) are checked when it is
    built; this adds what needs torch: the model name and options, and the parameter count.

    Args:
        spec: The job.
        where: Where the spec came from (its file), put in front of the problem.

    Raises:
        ConfigError: naming ``model`` and what is wrong (unknown names and options list
            the known ones).
    """
    from hypha.training.models import MODEL_NAMES, check_task_model  # torch: only when checking

    model = spec.model
    try:
        return check_task_model(model_doc(spec), base_dir=Path.cwd())
    except ValueError as exc:  # build_model names an unknown model and lists the known ones
        if model.kind == "hf":
            key = "model.path"
        else:
            key = "model.name" if model.name not in MODEL_NAMES else "model.options"
        raise ConfigError(f"1 problem(s) in {where}", [f"{where}: {key}: {exc}"]) from None


def train_task(spec: JobSpec, job_id: str, parameter_server: str) -> TrainTask:
    """A trainer's document: model, data, inner optimizer, and where its updates go."""
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
            total_steps=spec.total_inner_steps,
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
        checkpoint=checkpoint_doc(spec),
    )


def checkpoint_doc(spec: JobSpec) -> CheckpointDoc | None:
    """The job's checkpoint settings as the parameter server reads them (None: no checkpoints)."""
    c = spec.checkpoint
    if not c.store:
        return None
    return CheckpointDoc(
        store=c.store,
        every_rounds=c.every_rounds,
        keep_last_n=c.keep_last_n,
        compress=c.compress,
        endpoint_url=c.endpoint_url,
        region=c.region,
    )


def max_samples_per_update(spec: JobSpec) -> int:
    """Most samples one trainer's update may claim in a round (the parameter server refuses more).

    Fixed-H trainers run exactly ``fixed_inner_steps`` batches. A planned round targets
    ``samples_per_round`` over all trainers; one trainer may cover all of it alone and run on
    while its sync instruction travels, so it is allowed twice that, never a round's worth more.
    """
    if spec.fixed_inner_steps is not None:
        return spec.fixed_inner_steps * spec.batch_size
    return 2 * spec.samples_per_round
