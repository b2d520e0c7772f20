"""The data node role: announces prepared datasets and serves their slices.

Owns loading each dataset directory's manifest, announcing a ``DatasetRecord`` (slice count
and manifest hash, signed with this node's identity key: ``net/records.py``) plus a provider
record per node in the DHT, re-announcing periodically,
answering ``ManifestRequest`` and ``SliceRequest`` (a ``TensorOffer`` whose bytes the worker
pulls over the bulk path), and refusing unknown datasets and out-of-range indexes clearly.
The sha256 offered is the manifest's, so a slice corrupted on disk is caught by the worker.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import trio

from hypha.config.schema import DataConfig
from hypha.data.manifest import Manifest, load_manifest, manifest_sha256, slice_path
from hypha.errors import DataError, HyphaError
from hypha.net.bulk import BulkService
from hypha.net.host import Node
from hypha.net.records import DatasetSigner
from hypha.net.runner import run_role, settings_from_config
from hypha.protocol import ids
from hypha.protocol import messages as m

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedDataset:
    root: Path
    manifest: Manifest
    manifest_bytes: bytes

    def record(self, signer: DatasetSigner) -> m.DatasetRecord:
        """The dataset's DHT record, signed by ``signer`` (this node)."""
        sha256 = manifest_sha256(self.manifest_bytes)
        return signer.sign(self.manifest.name, self.manifest.num_slices, sha256)


def load_datasets(paths: list[Path]) -> dict[str, ServedDataset]:
    """Load every dataset directory; ``DataError`` names the broken one."""
    datasets: dict[str, ServedDataset] = {}
    for root in paths:
        manifest = load_manifest(root)
        if manifest.name in datasets:
            raise DataError(
                f"dataset {manifest.name!r} is listed twice ({datasets[manifest.name].root}, {root})"
            )
        datasets[manifest.name] = ServedDataset(root, manifest, (root / "manifest.json").read_bytes())
    return datasets


class DataNode:
    """Serves datasets from one node."""

    def __init__(self, node: Node, config: DataConfig) -> None:
        self.node = node
        self.config = config
        self.datasets = load_datasets(list(config.dataset_path))
        # Records are signed with the node's own identity (the key its TLS handshakes prove).
        signer = DatasetSigner.load(node.settings.tls)
        self.records = {name: served.record(signer) for name, served in self.datasets.items()}
        self.bulk = BulkService(node)
        self.num_slices_served = 0
        node.rpc.register(m.ManifestRequest, self._manifest)
        node.rpc.register(m.SliceRequest, self._slice)

    def _dataset(self, name: str) -> ServedDataset:
        served = self.datasets.get(name)
        if served is None:
            raise DataError(f"unknown dataset {name!r}; this node serves {sorted(self.datasets)}")
        return served

    async def _manifest(self, peer: str, request: m.ManifestRequest) -> m.ManifestResponse:
        served = self._dataset(request.dataset)
        return m.ManifestResponse(dataset=request.dataset, manifest=served.manifest_bytes)

    async def _slice(self, peer: str, request: m.SliceRequest) -> m.TensorOffer:
        served = self._dataset(request.dataset)
        if not 0 <= request.index < served.manifest.num_slices:
            count = served.manifest.num_slices
            raise DataError(f"slice {request.index} out of range: {request.dataset} has {count} slices")
        info = served.manifest.slices[request.index]
        self.num_slices_served += 1
        return await self.bulk.offer(
            slice_path(served.root, request.index),
            receiver=peer,
            purpose="slice",
            name=info.file,
            sha256=info.sha256,
        )

    async def announce(self) -> None:
        for served in self.datasets.values():
            key = ids.dataset_key(served.manifest.name)
            try:
                await self.node.dht.put(key, self.records[served.manifest.name])
                await self.node.dht.provide(key)
            except HyphaError as exc:
                logger.warning("announcing %s failed (will retry): %s", served.manifest.name, exc)

    async def _reannounce(self) -> None:
        while True:
            await trio.sleep(self.config.announce_interval_seconds)
            await self.announce()

    async def start(self, nursery: trio.Nursery) -> Mapping[str, object]:
        await nursery.start(self.bulk.run)
        await self.announce()
        nursery.start_soon(self._reannounce)
        for served in self.datasets.values():
            logger.info(
                "serving %s: %d slices from %s", served.manifest.name, served.manifest.num_slices, served.root
            )
        return {"datasets": sorted(self.datasets)}


async def run_data_node(
    config: DataConfig,
    *,
    ready_file: Path | None = None,
    task_status: trio.TaskStatus[DataNode] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a data node until cancelled."""
    settings = settings_from_config("data", config)
    await run_role(
        settings, lambda node: DataNode(node, config), ready_file=ready_file, task_status=task_status
    )
