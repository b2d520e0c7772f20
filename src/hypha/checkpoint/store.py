"""The checkpoint store: write a round's parameters, find the newest one that verifies, prune.

Owns the protocol on top of ``objects.py``: a write puts the data object, then the manifest
(which commits it), then prunes; ``latest()`` walks checkpoints newest first and returns the
first whose manifest parses, whose data object has the recorded size and whose (decompressed)
bytes have the recorded sha256, logging a warning for each one it passes over. One writer per
prefix (a job's parameter server); every call blocks, so call it from a worker thread, never
the trio loop. It does not choose when to checkpoint or what the bytes are (the parameter
server's business).
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Final

from hypha.checkpoint.manifest import (
    COMPRESSIONS,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    CheckpointInfo,
    Compression,
    Manifest,
    check_metadata,
    check_round,
    decode_data,
    encode_data,
    new_name,
    parse_name,
)
from hypha.checkpoint.objects import ObjectStore, open_objects

logger = logging.getLogger(__name__)

MIN_PART_SIZE_BYTES: Final = 5 * 1024 * 1024
"""S3 refuses multipart parts smaller than this (but the last)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class StoreOptions:
    """How a store keeps and reaches its checkpoints."""

    keep_last_n: int = 3
    """Committed checkpoints kept after a write; older ones are deleted, oldest first."""
    compress: Compression = "none"
    """``"none"`` or ``"zstd"`` for the data object."""
    endpoint_url: str | None = None
    """S3 endpoint (MinIO, a test server); None for AWS. Credentials come from the environment."""
    region: str | None = None
    """S3 region; None for the environment's default."""
    part_size_bytes: int = 64 * 1024 * 1024
    """Part size of S3 multipart uploads (objects of two parts or more go multipart)."""

    def __post_init__(self) -> None:
        if type(self.keep_last_n) is not int or self.keep_last_n < 1:
            raise ValueError(f"keep_last_n must be an int >= 1, got {self.keep_last_n!r}")
        if self.compress not in COMPRESSIONS:
            raise ValueError(f"compress must be one of {COMPRESSIONS}, got {self.compress!r}")
        if self.part_size_bytes < MIN_PART_SIZE_BYTES:
            raise ValueError(f"part_size_bytes must be >= {MIN_PART_SIZE_BYTES}, got {self.part_size_bytes}")


@dataclass(frozen=True, kw_only=True, slots=True)
class StoreStatistics:
    """Counters of one store since it was opened."""

    num_written: int
    bytes_written: int
    """Stored bytes (compressed when compression is on) of the data objects written."""
    num_pruned: int
    """Directories deleted: committed ones past ``keep_last_n`` and stray uncommitted ones."""
    num_skipped: int
    """Checkpoints ``latest()`` passed over because they did not verify."""
    num_prune_failures: int
    num_uploads_aborted: int
    """Unfinished S3 multipart uploads of writes that were cut off, aborted by a prune."""


@dataclass(frozen=True, slots=True)
class _Entry:
    """A directory under the prefix whose name parses; ``manifest`` None when not committed."""

    name: str
    round: int
    manifest: Manifest | None
    problem: str | None

    @property
    def order(self) -> tuple[int, float, str]:
        created = self.manifest.created if self.manifest is not None else 0.0
        return (self.round, created, self.name)


class _Unusable(Exception):
    """A checkpoint that does not verify (internal: ``latest()`` skips it)."""


class CheckpointStore:
    """Checkpoints under one prefix. Build it with ``open_store``.

    Not safe for concurrent use: one writer per prefix, calls made one at a time.
    """

    def __init__(self, objects: ObjectStore, options: StoreOptions) -> None:
        self._objects = objects
        self._options = options
        self._lock = threading.Lock()
        self._num_written = 0
        self._bytes_written = 0
        self._num_pruned = 0
        self._num_skipped = 0
        self._num_prune_failures = 0
        self._num_uploads_aborted = 0

    @property
    def url(self) -> str:
        """The store's URL as given to ``open_store``."""
        return self._objects.url

    def write(self, round_: int, data: bytes, metadata: dict[str, str] | None = None) -> CheckpointInfo:
        """Store ``data`` as the checkpoint of ``round_``, commit it, then prune.

        Args:
            round_: The outer round the parameters belong to, 0 to 99,999,999.
            data: The checkpoint's bytes (a SafeTensors file).
            metadata: String pairs kept in the manifest (job id, model, ...).

        Returns:
            The committed checkpoint.

        Raises:
            ValueError: Bad round or metadata, or metadata that makes the manifest over 1 MiB.
            CheckpointError: The store refused the write. The checkpoint is then not
                committed; a pruning failure after the commit is logged, not raised.
        """
        check_round(round_)
        metadata = check_metadata(metadata if metadata is not None else {})
        compression = self._options.compress
        stored = encode_data(data, compression)
        manifest = Manifest(
            version=FORMAT_VERSION,
            round=round_,
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
            compressed_size=len(stored),
            compression=compression,
            created=time.time(),
            metadata=metadata,
        )
        manifest_bytes = manifest.to_json()
        if len(manifest_bytes) > MAX_MANIFEST_BYTES:
            size = len(manifest_bytes)
            raise ValueError(f"metadata makes the manifest {size} bytes (at most {MAX_MANIFEST_BYTES})")
        name = new_name(round_)
        directory = self._objects.path(name)
        with self._objects.translated(f"write checkpoint {name}"):
            self._objects.make_directory(directory)
            self._objects.put(f"{directory}/{manifest.data_name}", stored)
            # The manifest goes last: until it exists the checkpoint is not committed.
            self._objects.put(f"{directory}/{MANIFEST_NAME}", manifest_bytes)
        with self._lock:
            self._num_written += 1
            self._bytes_written += len(stored)
        logger.info("checkpoint %s written: %d bytes (%d stored)", name, len(data), len(stored))
        try:
            with self._objects.translated("prune old checkpoints"):
                self._prune(keep=name)
        except Exception:
            # The checkpoint is committed: the caller's write succeeded. The next write prunes again.
            with self._lock:
                self._num_prune_failures += 1
            logger.warning("checkpoint store %s: pruning after %s failed", self.url, name, exc_info=True)
        return manifest.info(name)

    def latest(self) -> tuple[CheckpointInfo, bytes, dict[str, str]] | None:
        """The newest checkpoint that verifies, its uncompressed bytes and its metadata.

        A checkpoint that is not committed, whose manifest is invalid, whose data object is
        missing or of another size, or whose bytes do not match the sha256 is skipped with a
        warning, and the one before it is tried.

        Returns:
            ``(info, data, metadata)``, or None when no checkpoint verifies (or none exists).

        Raises:
            CheckpointError: The store cannot be read (as opposed to one checkpoint in it).
        """
        with self._objects.translated("read checkpoints"):
            entries = sorted(self._scan(), key=lambda entry: entry.order, reverse=True)
            for entry in entries:
                try:
                    data = self._verified_data(entry)
                except _Unusable as exc:
                    with self._lock:
                        self._num_skipped += 1
                    logger.warning("checkpoint %s in %s skipped: %s", entry.name, self.url, exc)
                    continue
                assert entry.manifest is not None
                return entry.manifest.info(entry.name), data, dict(entry.manifest.metadata)
        return None

    def list(self) -> builtins.list[CheckpointInfo]:
        """The committed checkpoints (valid manifest), oldest first; their data is not read.

        Raises:
            CheckpointError: The store cannot be read.
        """
        with self._objects.translated("list checkpoints"):
            entries = sorted(self._scan(), key=lambda entry: entry.order)
        return [entry.manifest.info(entry.name) for entry in entries if entry.manifest is not None]

    def statistics(self) -> StoreStatistics:
        """A snapshot of the counters."""
        with self._lock:
            return StoreStatistics(
                num_written=self._num_written,
                bytes_written=self._bytes_written,
                num_pruned=self._num_pruned,
                num_skipped=self._num_skipped,
                num_prune_failures=self._num_prune_failures,
                num_uploads_aborted=self._num_uploads_aborted,
            )

    def _scan(self) -> builtins.list[_Entry]:
        """Every directory under the prefix whose name is a checkpoint name, with its manifest."""
        entries: builtins.list[_Entry] = []
        for name in self._objects.names():
            round_ = parse_name(name)
            if round_ is None:
                continue  # not ours: never touched
            try:
                raw = self._objects.read(self._objects.path(name, MANIFEST_NAME), MAX_MANIFEST_BYTES)
            except FileNotFoundError:
                entries.append(_Entry(name, round_, None, "not committed (no manifest)"))
                continue
            try:
                manifest = Manifest.from_json(raw)
            except ValueError as exc:
                entries.append(_Entry(name, round_, None, str(exc)))
                continue
            if manifest.round != round_:
                entries.append(_Entry(name, round_, None, f"manifest says round {manifest.round}"))
                continue
            entries.append(_Entry(name, round_, manifest, None))
        return entries

    def _verified_data(self, entry: _Entry) -> bytes:
        manifest = entry.manifest
        if manifest is None:
            raise _Unusable(entry.problem or "not committed")
        path = self._objects.path(entry.name, manifest.data_name)
        try:
            expected = manifest.compressed_size
            stored_size = self._objects.size(path)
            if stored_size != expected:
                raise _Unusable(f"data object is {stored_size} bytes, manifest says {expected}")
            stored = self._objects.read(path, expected)
        except FileNotFoundError as exc:
            raise _Unusable(f"data object {manifest.data_name} is missing") from exc
        if len(stored) != manifest.compressed_size:
            raise _Unusable(f"read {len(stored)} bytes of data, manifest says {manifest.compressed_size}")
        try:
            data = decode_data(stored, manifest.compression, manifest.size)
        except ValueError as exc:
            raise _Unusable(str(exc)) from exc
        if len(data) != manifest.size:
            raise _Unusable(f"data is {len(data)} bytes uncompressed, manifest says {manifest.size}")
        if hashlib.sha256(data).hexdigest() != manifest.sha256:
            raise _Unusable("sha256 of the data does not match the manifest")
        return data

    def _prune(self, keep: str) -> None:
        """Delete committed checkpoints past ``keep_last_n``, and strays (uncommitted
        directories, unfinished uploads) of rounds up to the newest committed one."""
        entries = self._scan()
        committed = sorted((e for e in entries if e.manifest is not None), key=lambda e: e.order)
        num_excess = max(0, len(committed) - self._options.keep_last_n)
        doomed = [e for e in committed[:num_excess] if e.name != keep]
        if not committed:
            return
        newest = committed[-1].round
        doomed += [e for e in entries if e.manifest is None and e.round <= newest]
        kept = {e.name for e in committed}
        for directory, key, upload_id in self._objects.unfinished_uploads():
            round_ = parse_name(directory)
            if round_ is not None and round_ <= newest and directory not in kept:
                # A write cut off mid-upload (one writer per prefix: none is running now).
                self._objects.abort_upload(key, upload_id)
                with self._lock:
                    self._num_uploads_aborted += 1
                logger.info("unfinished upload of %s aborted", key)
        for entry in doomed:
            # The manifest first: a crash part way leaves an uncommitted stray, never a
            # committed checkpoint without its data.
            self._objects.remove_tree(self._objects.path(entry.name), first=MANIFEST_NAME)
            with self._lock:
                self._num_pruned += 1
            logger.info("checkpoint %s deleted (%s)", entry.name, entry.problem or "past keep_last_n")


def open_store(url: str, options: StoreOptions | None = None) -> CheckpointStore:
    """Open the checkpoint store at ``url``, checking that it can be used.

    Args:
        url: ``s3://bucket[/prefix]``, ``file:///abs/dir`` or ``/abs/dir`` (created if absent).
        options: Retention, compression and S3 endpoint; defaults when None.

    Returns:
        The store. A local directory is checked for writing; an S3 prefix for listing (the
        bucket exists, the credentials are accepted).

    Raises:
        CheckpointError: Unsupported URL, or a store that cannot be used; the message says why.
    """
    options = options if options is not None else StoreOptions()
    objects = open_objects(
        url, endpoint_url=options.endpoint_url, region=options.region, part_size_bytes=options.part_size_bytes
    )
    objects.probe()
    return CheckpointStore(objects, options)
