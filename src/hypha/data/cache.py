"""Worker-side slice cache: fetch once, verify, keep the most recently used slices on disk.

``SliceCache`` owns a directory of slice files named ``<dataset>/<index:05d>-<sha8>.safetensors``.
It fetches a missing slice through an injected ``Fetcher``, checks the sha256 in a thread,
refuses bad bytes with ``TransferError``, shares one fetch among concurrent callers, evicts
the least recently used unpinned files beyond its capacity and prefetches in the background
from ``run()``. It does not choose providers, retry or fail over: the fetcher does that.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

from hypha.data.manifest import CHUNK_BYTES, is_valid_name
from hypha.errors import HyphaError, TransferError
from hypha.protocol.names import is_sha256

if TYPE_CHECKING:
    # The installed trio-stubs (from trio-typing, pulled in by libp2p) shadow trio's own
    # annotations and export TaskStatus only from trio_typing.
    from trio_typing import TaskStatus

logger = logging.getLogger(__name__)

_FILE_RE: Final = re.compile(r"^(\d{5,})-([0-9a-f]{8})\.safetensors$")


@dataclass(frozen=True)
class SliceRef:
    """Which slice to get and what its bytes must hash to.

    Attributes:
        dataset: The dataset name.
        index: The slice index.
        sha256: The hex sha256 the manifest records for the slice.
        size: The expected byte size, when known.
    """

    dataset: str
    index: int
    sha256: str
    size: int | None = None

    def __post_init__(self) -> None:
        if not is_valid_name(self.dataset):
            raise ValueError(f"dataset name {self.dataset!r} is not valid")
        if self.index < 0:
            raise ValueError(f"slice index must be >= 0, got {self.index}")
        if not is_sha256(self.sha256):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if self.size is not None and self.size < 0:
            raise ValueError(f"size must be >= 0, got {self.size}")

    @property
    def key(self) -> tuple[str, int]:
        """``(dataset, index)``: the slice's position, whatever its content."""
        return (self.dataset, self.index)


Fetcher = Callable[[SliceRef, Path], Awaitable[None]]
"""Writes the slice's bytes to the given temporary path; may raise on failure."""

_Identity = tuple[str, int, str]


@dataclass(frozen=True)
class CacheStatistics:
    """A snapshot of a ``SliceCache``'s counters (for telemetry)."""

    hits: int
    misses: int
    fetches: int
    evictions: int
    verify_failures: int
    bytes_fetched: int
    num_cached: int


@dataclass
class _Entry:
    path: Path
    size: int
    num_pins: int = 0


class _Job:
    """One in-flight fetch of a slice, shared by every task that asked for it."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.entry: _Entry | None = None
        self.error: Exception | None = None
        self.fetched = False
        self.num_waiters = 0


class SliceCache:
    """A bounded on-disk cache of verified slices.

    Args:
        root: The cache directory (created if missing). Files verified by an earlier run
            are reused after their sha256 is checked again.
        capacity: The most slice files to keep; pinned files may exceed it for a while.
        fetch: Downloads a slice into a temporary path.
        prefetch_depth: How many background fetches ``prefetch`` may queue and run.
        discard: Disposes of an evicted file (default: unlink); a worker recycles them.
    """

    def __init__(
        self,
        root: Path,
        capacity: int,
        fetch: Fetcher,
        prefetch_depth: int = 2,
        discard: Callable[[Path], object] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if prefetch_depth < 0:
            raise ValueError(f"prefetch_depth must be >= 0, got {prefetch_depth}")
        self._root = Path(root)
        self._capacity = capacity
        self._fetch = fetch
        self._prefetch_depth = prefetch_depth
        self._discard = discard or (lambda path: path.unlink(missing_ok=True))
        self._entries: OrderedDict[_Identity, _Entry] = OrderedDict()
        self._unverified: dict[tuple[str, int, str], Path] = {}
        self._jobs: dict[_Identity, _Job] = {}
        self._queued: set[SliceRef] = set()
        self._send, self._receive = trio.open_memory_channel[SliceRef](prefetch_depth)
        self._running = False
        self._num_temporaries = 0
        self._hits = self._misses = self._fetches = self._evictions = 0
        self._verify_failures = self._bytes_fetched = 0
        self._root.mkdir(parents=True, exist_ok=True)
        self._scan()
        self._evict()

    # --- public API ---------------------------------------------------------------------

    async def get(self, ref: SliceRef) -> Path:
        """Return the path of the verified slice, fetching it first if needed.

        The path stays valid until the slice is evicted, which happens only after another
        slice is acquired; use ``open`` to pin it for longer.

        Raises:
            TransferError: The fetch failed or its bytes did not match ``ref.sha256``.

        Cancellation: safe; a cancelled fetch leaves no file behind, and tasks that were
        waiting on it start their own.
        """
        entry = await self._acquire_counted(ref)
        self._release(entry, keep=True)  # the caller is about to use the file
        return entry.path

    @asynccontextmanager
    async def open(self, ref: SliceRef) -> AsyncIterator[Path]:
        """Pin the slice while the block runs, so that eviction cannot remove it.

        Raises:
            TransferError: As for ``get``.
        """
        entry = await self._acquire_counted(ref)
        try:
            yield entry.path
        finally:
            self._release(entry)

    def prefetch(self, refs: Sequence[SliceRef]) -> int:
        """Queue background fetches of up to ``prefetch_depth`` of ``refs`` not yet cached.

        Prefetching is a hint: refs that do not fit the queue are dropped, and failures are
        logged (the later ``get`` fetches again and raises). Fetches run only while ``run``
        runs. Returns the number of refs queued.
        """
        num_queued = 0
        for ref in refs:
            if num_queued >= self._prefetch_depth:
                break
            if self.contains(ref) or _identity(ref) in self._jobs or ref in self._queued:
                continue
            try:
                self._send.send_nowait(ref)
            except trio.WouldBlock:
                break
            self._queued.add(ref)
            num_queued += 1
        return num_queued

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the background prefetch tasks until cancelled.

        Start it with ``await nursery.start(cache.run)``.
        """
        if self._running:
            raise RuntimeError("SliceCache.run is already running")
        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self._prefetch_depth):
                    nursery.start_soon(self._prefetch_worker)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._running = False

    def contains(self, ref: SliceRef) -> bool:
        """Return whether the slice is cached and verified (no I/O)."""
        return _identity(ref) in self._entries

    def statistics(self) -> CacheStatistics:
        """Return a snapshot of the counters."""
        return CacheStatistics(
            hits=self._hits,
            misses=self._misses,
            fetches=self._fetches,
            evictions=self._evictions,
            verify_failures=self._verify_failures,
            bytes_fetched=self._bytes_fetched,
            num_cached=len(self._entries) + len(self._unverified),
        )

    # --- acquiring ----------------------------------------------------------------------

    async def _acquire_counted(self, ref: SliceRef) -> _Entry:
        entry, fetched = await self._acquire(ref)
        if fetched:
            self._misses += 1
        else:
            self._hits += 1
        return entry

    async def _acquire(self, ref: SliceRef) -> tuple[_Entry, bool]:
        """Return the slice's entry with one pin held for the caller, and whether it was fetched."""
        identity = _identity(ref)
        while True:
            entry = self._entries.get(identity)
            if entry is not None:
                self._entries.move_to_end(identity)
                entry.num_pins += 1
                return entry, False
            job = self._jobs.get(identity)
            if job is None:
                return await self._run_job(ref)
            job.num_waiters += 1
            try:
                await job.done.wait()
            except BaseException:
                if job.entry is not None:
                    self._release(job.entry)  # the job pinned it on our behalf
                else:
                    job.num_waiters -= 1
                raise
            if job.entry is not None:
                return job.entry, job.fetched
            if job.error is not None:
                raise TransferError(
                    f"slice {ref.dataset}/{ref.index}: shared fetch failed: {job.error}"
                ) from job.error
            # The fetching task was cancelled: try again, possibly fetching ourselves.

    async def _run_job(self, ref: SliceRef) -> tuple[_Entry, bool]:
        identity = _identity(ref)
        job = _Job()
        self._jobs[identity] = job
        try:
            entry, job.fetched = await self._materialize(ref)
        except Exception as exc:
            job.error = exc
            raise
        else:
            entry.num_pins += 1 + job.num_waiters
            job.entry = entry
            return entry, job.fetched
        finally:
            del self._jobs[identity]
            job.done.set()
            self._evict()

    async def _materialize(self, ref: SliceRef) -> tuple[_Entry, bool]:
        """Verify a file left by an earlier run, or fetch; insert and return the entry."""
        path = self._path(ref)
        key = (ref.dataset, ref.index, ref.sha256[:8])
        leftover = self._unverified.pop(key, None)
        if leftover is not None:
            try:
                size, digest = await trio.to_thread.run_sync(_size_and_sha256, leftover)
            except OSError:
                size, digest = -1, ""
            except BaseException:
                self._unverified[key] = leftover  # cancelled: still on disk, still unverified
                raise
            if _matches(ref, size, digest):
                return self._insert(ref, path, size), False
            leftover.unlink(missing_ok=True)
        # Like unlinking, mkdir is a quick metadata operation and runs inline.
        path.parent.mkdir(parents=True, exist_ok=True)
        self._num_temporaries += 1
        temporary = path.with_name(f".{path.stem}.{self._num_temporaries}.part")
        self._fetches += 1
        try:
            await self._fetch(ref, temporary)
            size, digest = await trio.to_thread.run_sync(_size_and_sha256, temporary)
        except BaseException as exc:
            temporary.unlink(missing_ok=True)
            if isinstance(exc, Exception) and not isinstance(exc, HyphaError):
                raise TransferError(f"fetching slice {ref.dataset}/{ref.index} failed: {exc!r}") from exc
            raise
        if not _matches(ref, size, digest):
            temporary.unlink(missing_ok=True)
            self._verify_failures += 1
            raise TransferError(
                f"slice {ref.dataset}/{ref.index}: got {size} bytes with sha256 {digest[:16]}..., "
                f"expected sha256 {ref.sha256[:16]}...; bytes refused"
            )
        try:
            os.replace(temporary, path)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise TransferError(f"cannot store slice {ref.dataset}/{ref.index}: {exc}") from exc
        self._bytes_fetched += size
        return self._insert(ref, path, size), True

    def _insert(self, ref: SliceRef, path: Path, size: int) -> _Entry:
        entry = _Entry(path=path, size=size)
        self._entries[_identity(ref)] = entry
        return entry

    def _release(self, entry: _Entry, *, keep: bool = False) -> None:
        entry.num_pins -= 1
        self._evict(keep=entry if keep else None)

    # --- disk ---------------------------------------------------------------------------

    def _path(self, ref: SliceRef) -> Path:
        return self._root / ref.dataset / f"{ref.index:05d}-{ref.sha256[:8]}.safetensors"

    def _evict(self, keep: _Entry | None = None) -> None:
        """Delete files beyond capacity: unverified leftovers first, then LRU unpinned ones."""
        # Unlinking (or recycling: a rename) is a quick metadata operation; it runs inline.
        while len(self._entries) + len(self._unverified) > self._capacity:
            if self._unverified:
                key = next(iter(self._unverified))
                self._unverified.pop(key).unlink(missing_ok=True)
            else:
                victim = next(
                    (k for k, e in self._entries.items() if e.num_pins == 0 and e is not keep),
                    None,
                )
                if victim is None:
                    return  # everything left is pinned (or kept)
                self._discard(self._entries.pop(victim).path)
            self._evictions += 1

    def _scan(self) -> None:
        """Index files left by an earlier run (verified on first use); drop partial files."""
        for directory in sorted(self._root.iterdir()):
            if not directory.is_dir() or not is_valid_name(directory.name):
                continue
            for path in sorted(directory.iterdir()):
                if path.name.endswith(".part"):
                    path.unlink(missing_ok=True)
                    continue
                match = _FILE_RE.fullmatch(path.name)
                if match is not None and path.is_file():
                    key = (directory.name, int(match.group(1)), match.group(2))
                    self._unverified[key] = path

    async def _prefetch_worker(self) -> None:
        async for ref in self._receive:
            self._queued.discard(ref)
            try:
                entry, _ = await self._acquire(ref)
            except HyphaError as exc:
                logger.warning("prefetch of slice %s/%d failed: %s", ref.dataset, ref.index, exc)
                continue
            self._release(entry)


def _identity(ref: SliceRef) -> _Identity:
    return (ref.dataset, ref.index, ref.sha256)


def _matches(ref: SliceRef, size: int, digest: str) -> bool:
    return digest == ref.sha256 and (ref.size is None or size == ref.size)


def _size_and_sha256(path: Path) -> tuple[int, str]:
    """Return a file's size and hex sha256 (blocking; runs in a worker thread)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()
