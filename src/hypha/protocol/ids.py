"""Protocol identifiers, gossip topics and DHT key prefixes.

Owns every string that names a protocol on the wire, so that a rename happens in one place.
Nothing here opens a stream or knows about libp2p objects.
"""

from __future__ import annotations

API_PROTOCOL = "/hypha/api/1"
"""Request/response RPC: one framed request and one framed response per stream."""

PROGRESS_PROTOCOL = "/hypha/progress/1"
"""Training progress from workers to the scheduler (same framing as the API)."""

HEALTH_PROTOCOL = "/hypha/health/1"
"""Liveness probe answered by every node."""

SLICE_PROTOCOL = "/hypha/slice/1"
"""Stream fallback for dataset slices (used when no direct bulk connection is possible)."""

TENSOR_PROTOCOL = "/hypha/tensor/1"
"""Stream fallback for bulk bytes (through a relay)."""

WORKER_TOPIC = "hypha/worker"
"""Gossip topic on which schedulers advertise their resource needs."""

DATASET_KEY_PREFIX = "/hypha/dataset/"
"""DHT key prefix of dataset records: ``/hypha/dataset/<name>``."""

DHT_NAMESPACE = "hypha"


def dataset_key(name: str) -> str:
    """Return the DHT key under which the dataset ``name`` is announced."""
    return f"{DATASET_KEY_PREFIX}{name}"
