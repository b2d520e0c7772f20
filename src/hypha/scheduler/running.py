"""Running one job: finding its dataset, its state (new or resumed), the driver, persistence.

Owns ``run_job``: the dataset is looked up in the network; the job's state is new, or taken
up from the scheduler's ``StateStore`` when resuming an unfinished job of the same name (its
old tasks and leases are gone with the old scheduler; its round, slices and checkpoint
reference stay); the state is saved as it changes; the ``JobDriver`` runs the job.
"""

from __future__ import annotations

import logging

import trio

from hypha.config.job import JobSpec
from hypha.scheduler.dataset import discover_dataset
from hypha.scheduler.job import DATASET_WAIT_SECONDS, JobContext, JobDriver
from hypha.scheduler.results import JobRecorder
from hypha.scheduler.state import JobState
from hypha.scheduler.store import StateStore, persist

logger = logging.getLogger(__name__)


async def run_job(
    ctx: JobContext, spec: JobSpec, store: StateStore | None = None, *, resume: bool = False
) -> JobState:
    """Find the dataset, then run ``spec`` to completion; returns the job's final state.

    With a ``store`` the state is saved as it changes; with ``resume`` the job's saved state,
    if it holds an unfinished job of this name, is taken up where it was saved.

    Raises:
        DataError: The dataset is not found in the network.
        JobError: The job cannot run or failed, with a clear reason.
    """
    dataset, manifest = await discover_dataset(
        ctx.node, spec.dataset, timeout_seconds=DATASET_WAIT_SECONDS, sha256=spec.dataset_sha256
    )
    logger.info(
        "dataset %s: %d slices from %d providers", spec.dataset, dataset.num_slices, len(dataset.providers)
    )
    state = await _resumed_state(store, spec) if resume else None
    if state is None:
        state = JobState.create(spec)
    state.set_dataset(dataset)
    recorder = JobRecorder(spec.out, spec, state.job_id)
    await recorder.start(resume=state.finished_rounds > 0)
    driver = JobDriver(ctx, state, manifest, recorder)
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.bulk.run)
        if store is not None:
            nursery.start_soon(persist, state, store)
        await driver.run()
        nursery.cancel_scope.cancel()
    if recorder.final_loss is not None:
        logger.info("job %s finished: final loss %.4f", spec.name, recorder.final_loss)
    return state


async def _resumed_state(store: StateStore | None, spec: JobSpec) -> JobState | None:
    """The saved state of an unfinished job named like ``spec``, ready to go on (None: none)."""
    doc = await trio.to_thread.run_sync(store.load, spec.name) if store is not None else None
    if doc is None or doc["done"]:
        logger.info("no unfinished job %s to resume: it starts from round 0", spec.name)
        return None
    state = JobState.from_dict(doc)
    released = state.restarted()
    logger.warning(
        "resuming job %s (%s) at round %d; slices %s back to AVAILABLE",
        spec.name,
        state.job_id,
        state.round,
        released,
    )
    return state
