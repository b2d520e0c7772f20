"""Spare files that incoming transfers overwrite instead of creating new files.

Owns one directory of files a node no longer needs (an evicted cache slice, an update the
parameter server has applied) and hands them out to the next transfer of a similar size.
Writing a new file makes the kernel find, zero and map a fresh page for every 4 KiB; on a
VM whose freed memory is returned to the host it must also fault each page back in, which
measured 268 MB/s on the two-core benchmark machine against 8 GB/s for overwriting a file
whose pages are still cached (``bench/bulk_transfer.py``). A node that keeps receiving files
of the same sizes (slices, one update per trainer per round) thus writes into warm pages.

The pool keeps at most ``max_bytes``; what does not fit is deleted. Spares live next to the
files they replace (one filesystem, so taking one is a rename). Thread-safe: transfers take
spares from worker threads.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SpareStatistics:
    """What a ``SpareFiles`` pool holds right now."""

    num_files: int
    num_bytes: int
    max_bytes: int
    """The pool's bound: a file that would take it past this is deleted instead."""


class SpareFiles:
    """A bounded pool of recyclable files in ``directory`` (emptied when the pool opens)."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        self._dir = Path(directory)
        shutil.rmtree(self._dir, ignore_errors=True)  # spares of an earlier run are cold anyway
        self._dir.mkdir(parents=True, exist_ok=True)
        self._max = max_bytes
        self._sizes: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._names = itertools.count()

    def statistics(self) -> SpareStatistics:
        """Return a snapshot of the files and bytes kept."""
        with self._lock:
            return SpareStatistics(
                num_files=len(self._sizes), num_bytes=sum(self._sizes.values()), max_bytes=self._max
            )

    def give(self, path: Path) -> bool:
        """Keep ``path`` as a spare (moved into the pool) or delete it; True if kept.

        A missing ``path`` is ignored. A file with other names (a hard link into a task's
        work directory) is only unlinked: overwriting it would change what they read.
        """
        path = Path(path)
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        size = st.st_size
        with self._lock:
            kept = st.st_nlink == 1 and size > 0 and sum(self._sizes.values()) + size <= self._max
            if kept:
                spare = self._dir / f"spare-{next(self._names)}"
                try:
                    os.replace(path, spare)
                except OSError as exc:  # another filesystem, or gone meanwhile
                    logger.debug("cannot keep %s as a spare: %s", path, exc)
                    kept = False
                else:
                    self._sizes[spare] = size
        if not kept:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return kept

    def take(self, size: int, dest: Path) -> bool:
        """Move the spare that best fits ``size`` bytes to ``dest``; False if none could be.

        Best fit: the smallest spare at least ``size`` long, else the largest one (the rest
        of the file is then new pages). The caller overwrites it from offset 0 and truncates
        it to what it wrote.
        """
        with self._lock:
            if not self._sizes:
                return False
            fits = [p for p, s in self._sizes.items() if s >= size]
            if fits:
                spare = min(fits, key=lambda p: self._sizes[p])
            else:
                spare = max(self._sizes, key=lambda p: self._sizes[p])
            del self._sizes[spare]
        try:
            os.replace(spare, dest)
        except OSError as exc:
            logger.debug("spare %s not usable for %s: %s", spare, dest, exc)
            with contextlib.suppress(OSError):
                spare.unlink()
            return False
        return True
