"""The worker's data plane: slices, weights and files in and out of its tasks.

Owns what a task's bridge fetch and send turn into on the network: asking the scheduler for
the next slice and pulling it (through the slice cache, failing over between data nodes),
asking the parameter server for the current weights, pushing files to peers over the bulk
path, and receiving pushes for local tasks (routed by job: updates to the sink the update
lookup names, weights and files to the job's trainer, in that task's inbox only: that is
``inbound.py``'s, each push authorized first by ``authorize.py``). It does not know the
parameter server: its requests are routed by ``executors/parameter_servers.py``.
"""

from __future__ import annotations

import logging
import os
import shutil
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import trio

from hypha import errors
from hypha.config.schema import WorkerConfig
from hypha.data.cache import SliceCache, SliceRef
from hypha.errors import (
    DataError,
    HyphaError,
    JobError,
    NotReadyError,
    RemoteError,
    TransferError,
)
from hypha.net.bulk import BulkService
from hypha.net.host import Node
from hypha.protocol import bridge as b
from hypha.protocol import codec
from hypha.protocol import messages as m
from hypha.worker.authorize import UpdateSinks
from hypha.worker.inbound import InboundPushes
from hypha.worker.task import Task, TaskTable, train_doc

logger = logging.getLogger(__name__)

MIN_BYTES_PER_SECOND = 2_000_000
"""Slowest channel a push is given time for (a relayed libp2p stream runs at 5-9 MB/s)."""


@dataclass(frozen=True, slots=True)
class TransferStatistics:
    """A snapshot of a ``Transfers``' counters (for telemetry); the slice cache has its own."""

    num_slices_assigned: int
    num_slices_returned: int
    num_weights_fetched: int
    num_pushes_delivered: int
    num_pushes_failed: int
    num_received: int
    num_refused: int
    """Pushes refused (``authorize.py``): no task or aggregator of their job here, or a sender
    or content the job does not allow."""


def _failure(exc: BaseException) -> str:
    """Why a fetch failed, in words; a cancellation may arrive inside an exception group."""
    if errors.only_cancelled(exc, trio.Cancelled):
        return _CANCELLED
    return "; ".join(
        _CANCELLED if isinstance(leaf, trio.Cancelled) else str(leaf) or repr(leaf)
        for leaf in errors.leaves(exc)
    )


_CANCELLED = "the fetch was cancelled"


def _link_or_copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


class Transfers:
    """Implements ``worker.backend.TaskServices`` and serves incoming pushes.

    Args:
        node: the worker's node (``inbound.py`` registers ``TensorPushRequest`` on it).
        bulk: the worker's bulk channel.
        config: the worker's section.
        update_sinks: where a pushed update of a job goes.
        tasks: the worker's running tasks (read only: a pushed file goes to its job's trainer).
    """

    def __init__(
        self,
        node: Node,
        bulk: BulkService,
        config: WorkerConfig,
        *,
        update_sinks: UpdateSinks,
        tasks: TaskTable,
    ) -> None:
        self._node = node
        self._bulk = bulk
        self._config = config
        self._num_assigned = self._num_returned = self._num_weights = 0
        self._num_delivered = self._num_push_failures = 0
        self._providers: dict[tuple[str, int], list[str]] = {}
        self.cache = SliceCache(
            config.work_dir / "cache",
            config.cache_slices,
            self._fetch_slice,
            prefetch_depth=config.prefetch_depth,
            discard=bulk.recycle,
        )
        self.inbound = InboundPushes(node, bulk, update_sinks=update_sinks, tasks=tasks)

    def statistics(self) -> TransferStatistics:
        """Return a snapshot of the counters."""
        return TransferStatistics(
            num_slices_assigned=self._num_assigned,
            num_slices_returned=self._num_returned,
            num_weights_fetched=self._num_weights,
            num_pushes_delivered=self._num_delivered,
            num_pushes_failed=self._num_push_failures,
            num_received=self.inbound.num_received,
            num_refused=self.inbound.num_refused,
        )

    @property
    def bulk(self) -> BulkService:
        """The worker's bulk channel (the parameter server offers weights through it)."""
        return self._bulk

    def set_providers(self, ref: SliceRef, providers: list[str]) -> None:
        """Who serves ``ref``, in the order to try them (the cache's fetcher fails over)."""
        self._providers[ref.key] = list(providers)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.cache.run)
            task_status.started()

    # --- fetch ------------------------------------------------------------------------

    async def fetch(self, task: Task, ref: b.Reference, work_dir: Path) -> list[b.FetchedFile]:
        if isinstance(ref, b.SliceRef):
            return [await self._fetch_assigned_slice(task, ref.dataset, work_dir)]
        if isinstance(ref, b.WeightsRef):
            return [await self._fetch_weights(task, ref.round, work_dir)]
        if isinstance(ref, b.UriRef):
            return [await self._fetch_uri(ref.uri, work_dir)]
        raise DataError(f"{type(ref).__name__} references are not served by this worker")

    async def _fetch_assigned_slice(self, task: Task, dataset: str | None, work_dir: Path) -> b.FetchedFile:
        name = dataset or train_doc(task).dataset
        # Shielded (the request has its own time limit): once the scheduler assigned a slice
        # we must hear which, so that a fetch cancelled meanwhile can give it back below.
        with trio.CancelScope(shield=True):
            reply = await self._node.request(
                task.scheduler, m.NextSliceRequest(job_id=task.job_id, dataset=name), m.Msg
            )
        if isinstance(reply, m.NoSlice):
            raise NotReadyError(f"no slice available right now: {reply.reason}")
        assign = codec.expect(reply, m.SliceAssign)
        self._num_assigned += 1
        for hint in assign.upcoming:
            self._providers[(assign.dataset, hint.index)] = list(assign.providers)
        self._providers[(assign.dataset, assign.index)] = list(assign.providers)
        try:  # names and digests from the wire become cache paths: checked by SliceRef
            ref = SliceRef(dataset=assign.dataset, index=assign.index, sha256=assign.sha256)
            upcoming = [
                SliceRef(dataset=assign.dataset, index=h.index, sha256=h.sha256) for h in assign.upcoming
            ]
        except ValueError as exc:
            raise DataError(f"the scheduler assigned an unusable slice: {exc}") from exc
        self.cache.prefetch(upcoming)
        rel = Path("slices") / f"{assign.dataset}-{assign.index:05d}.safetensors"
        try:
            async with self.cache.open(ref) as cached:
                await trio.to_thread.run_sync(_link_or_copy, cached, work_dir / rel)
        except BaseException as exc:  # cancellations (also inside a group) included
            # The scheduler must not count on this slice being trained here: hand it back.
            await self._return_slice(task, assign, _failure(exc))
            if isinstance(exc, OSError):
                raise DataError(f"cannot store slice {assign.index} in the task's folder: {exc}") from exc
            raise
        size = (await trio.Path(work_dir / rel).stat()).st_size
        return b.FetchedFile(
            path=str(rel),
            size=size,
            sha256=assign.sha256,
            index=assign.index,
            dataset=assign.dataset,
            epoch=assign.epoch,
        )

    async def _return_slice(self, task: Task, assign: m.SliceAssign, reason: str) -> None:
        """Tell the scheduler that ``assign`` will not be trained here (best effort, shielded)."""
        returned = m.SliceReturned(
            job_id=task.job_id,
            dataset=assign.dataset,
            index=assign.index,
            epoch=assign.epoch,
            reason=reason[:500],
        )
        self._num_returned += 1
        # Shielded so that a cancelled fetch still reports; short so that shutdown is not held up.
        with trio.move_on_after(min(5.0, self._node.settings.rpc_timeout_seconds)) as scope:
            scope.shield = True
            try:
                await self._node.request(task.scheduler, returned, m.Ack)
                return
            except Exception as exc:  # never replaces the failure being handled
                logger.warning("could not give slice %d back to the scheduler: %s", assign.index, exc)
                return
        logger.warning("could not give slice %d back to the scheduler: no answer", assign.index)

    async def _fetch_slice(self, ref: SliceRef, dest: Path) -> None:
        """The cache's fetcher: try every provider, with backoff between rounds."""
        providers = self._providers.get(ref.key, [])
        if not providers:
            raise TransferError(f"no known provider of {ref.dataset} slice {ref.index}")
        failures: list[str] = []
        delay = 0.1
        for _round in range(3):
            for provider in providers:
                try:
                    offer = await self._node.request(
                        provider, m.SliceRequest(dataset=ref.dataset, index=ref.index), m.TensorOffer
                    )
                    if offer.sha256 != ref.sha256:
                        raise TransferError(f"{provider} offers slice {ref.index} with another sha256")
                    await self._bulk.pull(offer, provider, dest, attempts=2)
                    return
                except HyphaError as exc:  # timeouts included (RequestTimeoutError)
                    failures.append(f"{provider[-8:]}: {exc}")
                    logger.warning("slice %s/%d from %s failed: %s", ref.dataset, ref.index, provider, exc)
            await trio.sleep(delay)
            delay *= 2
        raise TransferError(
            f"slice {ref.dataset}/{ref.index} could not be fetched: " + "; ".join(failures[-4:])
        )

    async def _fetch_weights(self, task: Task, round_: int | None, work_dir: Path) -> b.FetchedFile:
        doc = train_doc(task)
        if not doc.parameter_server:
            raise JobError("the job names no parameter server")
        try:
            offer = await self._node.request(
                doc.parameter_server, m.WeightsRequest(job_id=task.job_id, round=round_), m.TensorOffer
            )
        except RemoteError as exc:
            if exc.code == NotReadyError.wire_code:
                raise NotReadyError(exc.detail) from exc
            raise
        rel = Path("weights") / f"global-{offer.round:05d}.safetensors"
        await self._bulk.pull(offer, doc.parameter_server, work_dir / rel)
        self._num_weights += 1
        return b.FetchedFile(path=str(rel), size=offer.size, sha256=offer.sha256)

    async def _fetch_uri(self, uri: str, work_dir: Path) -> b.FetchedFile:
        if not any(uri.startswith(prefix) for prefix in self._config.uri_allow):
            raise DataError(f"URI {uri} is not on this worker's allow-list (uri_allow)")
        parsed = urllib.parse.urlparse(uri)
        name = Path(parsed.path).name or "download"
        rel = Path("downloads") / name
        dest = work_dir / rel

        def download() -> None:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(uri, timeout=30) as response, dest.open("wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)

        try:
            await trio.to_thread.run_sync(download)
        except OSError as exc:
            raise TransferError(f"cannot fetch {uri}: {exc}") from exc
        from hypha.data.manifest import sha256_file

        sha256 = await trio.to_thread.run_sync(sha256_file, dest)
        return b.FetchedFile(path=str(rel), size=(await trio.Path(dest).stat()).st_size, sha256=sha256)

    # --- send -------------------------------------------------------------------------

    async def send(self, task: Task, request: b.SendRequest, path: Path) -> list[str]:
        if request.target == "parameter_server":
            peers = [train_doc(task).parameter_server]
        elif request.target == "peers":
            peers = list(request.peers)
        else:
            raise DataError("target 'trainers' is only for the parameter server")
        return await self.push(
            path,
            peers,
            purpose=request.purpose,
            job_id=task.job_id,
            round_=request.round,
            samples=request.samples,
            encoding=request.encoding,
        )

    async def push(
        self,
        path: Path,
        peers: list[str],
        *,
        purpose: m.Purpose,
        job_id: str,
        round_: int = 0,
        samples: int = 0,
        encoding: m.Encoding = "fp32",
        name: str = "",
    ) -> list[str]:
        """Offer ``path`` to each peer and wait until each confirmed storing it."""
        delivered: list[str] = []
        failures: list[str] = []
        sha: str | None = None
        for peer in peers:
            offer = await self._bulk.offer(
                path,
                receiver=peer,
                purpose=purpose,
                name=name or path.name,
                job_id=job_id,
                round=round_,
                samples=samples,
                encoding=encoding,
                sha256=sha,
            )
            sha = offer.sha256
            try:
                # The receiver pulls inside this request: allow for a slow (relayed) channel.
                deadline = self._node.settings.rpc_timeout_seconds + offer.size / MIN_BYTES_PER_SECOND
                done = await self._node.request(
                    peer, m.TensorPushRequest(offer=offer), m.TransferDone, timeout_seconds=deadline
                )
            except HyphaError as exc:
                failures.append(f"{peer}: {exc}")
                continue
            finally:
                self._bulk.withdraw(offer.transfer_id)
            if done.ok:
                delivered.append(peer)
            else:
                failures.append(f"{peer}: {done.detail}")
        self._num_delivered += len(delivered)
        self._num_push_failures += len(failures)
        if failures and not delivered:
            raise TransferError("; ".join(failures))
        for failure in failures:
            logger.warning("push of %s failed: %s", path.name, failure)
        return delivered
