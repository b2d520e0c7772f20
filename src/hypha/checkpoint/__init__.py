"""Checkpoints of a job's parameters, in a local directory or under an S3 prefix.

``open_store(url, StoreOptions(...))`` gives a ``CheckpointStore`` with ``write``,
``latest`` and ``list``. Everything here blocks and imports neither trio nor a role: the
parameter server calls it from a worker thread. This package decides how checkpoints are laid
out, committed, verified and pruned; when to take one, and what goes in it, is the caller's.
"""

from __future__ import annotations

from hypha.checkpoint.manifest import FORMAT_VERSION, MANIFEST_NAME, CheckpointInfo
from hypha.checkpoint.store import CheckpointStore, StoreOptions, StoreStatistics, open_store
from hypha.errors import CheckpointError

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointStore",
    "StoreOptions",
    "StoreStatistics",
    "open_store",
]
