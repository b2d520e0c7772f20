"""Objects under one checkpoint prefix, over fsspec: a local directory or an S3 prefix.

Owns the URL rules (``/abs/dir``, ``file:///abs/dir``, ``s3://bucket/prefix``), building the
filesystem (``fsspec``'s local one, or ``s3fs`` with credentials from the standard AWS
environment), the one write primitive that makes an object appear whole or not at all, bounded
reads, and the translation of storage failures into ``CheckpointError``. Everything is blocking.
It knows nothing of manifests or rounds (``manifest.py``, ``store.py``).

Writes: locally, a temporary name in the same directory, fsync, rename, fsync of the
directory; on S3 an object appears only when its upload completes (a single PUT, or s3fs
multipart in ``part_size_bytes`` parts). An upload cut off mid-way leaves an unfinished
multipart upload that readers never see; the store aborts it on a later prune
(``unfinished_uploads``), and a bucket lifecycle rule (``AbortIncompleteMultipartUpload``)
is the backstop for a prefix that is never written again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

from hypha.errors import CheckpointError


@dataclass(frozen=True, kw_only=True, slots=True)
class ObjectStore:
    """One prefix of a filesystem, with the failures that mean "the store is broken".

    Attributes:
        url: The store's URL as given, for messages.
        fs: The fsspec filesystem.
        root: The prefix inside ``fs`` (``bucket/prefix`` or an absolute path), no trailing ``/``.
        failures: Exception types that a storage call raises when the store cannot be used.
        part_size_bytes: Multipart part size for S3 uploads.
    """

    url: str
    fs: Any  # fsspec.AbstractFileSystem: fsspec is untyped
    root: str
    failures: tuple[type[Exception], ...]
    part_size_bytes: int

    @property
    def local(self) -> bool:
        """Whether this is a local directory (fsync and rename) rather than object storage."""
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        """The full path of ``parts`` under the root."""
        return "/".join((self.root, *parts))

    @contextlib.contextmanager
    def translated(self, doing: str) -> Iterator[None]:
        """Turn storage failures inside the block into ``CheckpointError`` naming ``doing``."""
        try:
            yield
        except CheckpointError:
            raise
        except self.failures as exc:
            detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise CheckpointError(f"checkpoint store {self.url}: cannot {doing}: {detail}") from exc

    def probe(self) -> None:
        """Fail now if the store cannot be used.

        Locally, create the root and write in it; on S3, list the prefix (which needs the
        bucket and accepted credentials).

        Raises:
            CheckpointError: It cannot.
        """
        if not self.local:
            with self.translated("list it"):
                self.names()
            return
        with self.translated("create it and write in it"):
            os.makedirs(self.root, exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=self.root, prefix=".probe.", suffix=".tmp")
            os.close(fd)
            os.unlink(temporary)

    def names(self) -> list[str]:
        """The names directly under the root (empty when the root does not exist yet)."""
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError as exc:
            if self.local:
                return []
            # On S3 an empty prefix and a missing bucket look alike: ask about the bucket.
            bucket = self.root.split("/", 1)[0]
            try:
                self.fs.info(bucket)
            except FileNotFoundError:
                raise FileNotFoundError(errno.ENOENT, f"bucket {bucket!r} does not exist") from exc
            return []
        paths = [str(entry).rstrip("/") for entry in entries]
        if paths == [self.root]:
            # fsspec lists a file as itself: the prefix is an object, not a directory.
            raise NotADirectoryError(errno.ENOTDIR, "the prefix is a file, not a directory")
        return sorted(path.rsplit("/", 1)[-1] for path in paths)

    def size(self, path: str) -> int:
        """The size of the object at ``path``; raises ``FileNotFoundError`` when absent."""
        return int(self.fs.size(path))

    def read(self, path: str, max_bytes: int) -> bytes:
        """Up to ``max_bytes + 1`` bytes of ``path`` (one more than allowed shows it is too big)."""
        data: bytes = self.fs.cat_file(path, start=0, end=max_bytes + 1)
        return data

    def put(self, path: str, data: bytes) -> None:
        """Write ``data`` at ``path`` so that readers see all of it or nothing."""
        if self.local:
            _put_local(path, data)
        else:
            self.fs.pipe_file(path, data, chunksize=self.part_size_bytes)

    def unfinished_uploads(self) -> list[tuple[str, str, str]]:
        """``(directory name under the root, key, upload id)`` of each unfinished S3 multipart
        upload below the root; always empty locally (a local write cut off leaves a temporary
        file in its checkpoint directory instead)."""
        if self.local:
            return []
        bucket, _, prefix = self.root.partition("/")
        key_prefix = f"{prefix}/" if prefix else ""
        found: list[tuple[str, str, str]] = []
        request: dict[str, str] = {"Bucket": bucket, "Prefix": key_prefix}
        while True:
            page = self.fs.call_s3("list_multipart_uploads", **request)
            for upload in page.get("Uploads", []):
                key = str(upload["Key"])
                directory, separator, _ = key[len(key_prefix) :].partition("/")
                if separator:
                    found.append((directory, key, str(upload["UploadId"])))
            if not page.get("IsTruncated"):
                return found
            request.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])

    def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort an unfinished S3 multipart upload, freeing its parts."""
        bucket = self.root.partition("/")[0]
        self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)

    def make_directory(self, path: str) -> None:
        """Create directory ``path`` durably (locally; S3 has no directories, so nothing)."""
        if self.local:
            os.makedirs(path, exist_ok=True)
            fsync_directory(os.path.dirname(path))

    def remove_tree(self, directory: str, first: str | None = None) -> None:
        """Delete ``directory`` and what it holds, ``first`` (a name in it) before the rest."""
        if first is not None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(f"{directory}/{first}")
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(directory, recursive=True)
        self.fs.invalidate_cache(self.root)


def open_objects(
    url: str, *, endpoint_url: str | None, region: str | None, part_size_bytes: int
) -> ObjectStore:
    """Build the ``ObjectStore`` for ``url``.

    Args:
        url: ``s3://bucket[/prefix]``, ``file:///abs/dir`` or ``/abs/dir``.
        endpoint_url: S3 endpoint (MinIO, a test server); None for AWS itself.
        region: S3 region; None for the environment's default.
        part_size_bytes: Multipart part size for S3 uploads.

    Raises:
        CheckpointError: The URL has another scheme, a relative path, or no bucket.
    """
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise CheckpointError(f"checkpoint store {url}: a query or fragment is not allowed")
    if parts.scheme == "s3":
        bucket, prefix = parts.netloc, parts.path.strip("/")
        if not bucket:
            raise CheckpointError(f"checkpoint store {url}: no bucket in the URL")
        return ObjectStore(
            url=url,
            fs=_s3_filesystem(endpoint_url, region),
            root=f"{bucket}/{prefix}" if prefix else bucket,
            failures=_s3_failures(),
            part_size_bytes=part_size_bytes,
        )
    if parts.scheme == "file" and parts.netloc not in ("", "localhost"):
        raise CheckpointError(f"checkpoint store {url}: a file URL names no host")
    if parts.scheme in ("", "file"):
        path = parts.path if parts.scheme else url
        if not os.path.isabs(path):
            raise CheckpointError(f"checkpoint store {url}: a local path must be absolute")
        return ObjectStore(
            url=url,
            fs=fsspec.filesystem("file"),
            root=os.path.normpath(path),
            failures=(OSError,),
            part_size_bytes=part_size_bytes,
        )
    raise CheckpointError(f"checkpoint store {url}: unsupported scheme {parts.scheme!r} (s3, file or a path)")


def _s3_filesystem(endpoint_url: str | None, region: str | None) -> Any:
    # Imported here: a local store must not need s3fs's import cost or its event loop thread.
    import s3fs

    client_kwargs: dict[str, str] = {}
    if region is not None:
        client_kwargs["region_name"] = region
    # Credentials come from botocore's standard chain (AWS_ACCESS_KEY_ID, ...), never from
    # here. No instance or listings cache: another process (a restarted server) may have
    # written since this one last looked.
    return s3fs.S3FileSystem(
        endpoint_url=endpoint_url,
        client_kwargs=client_kwargs,
        skip_instance_cache=True,
        use_listings_cache=False,
    )


def _s3_failures() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError

    # s3fs turns S3's answers into OSError subclasses; botocore's own failures (no
    # credentials, an endpoint that refuses connections) come through as they are.
    return (OSError, BotoCoreError)


def _put_local(path: str, data: bytes) -> None:
    directory = os.path.dirname(path)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    fsync_directory(directory)


def fsync_directory(path: str) -> None:
    """fsync a directory, making renames and new entries in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
