"""Finding a job's dataset in the network: its DHT record, its providers, a checked manifest.

Owns the lookup only (retrying until a deadline); the slices themselves are fetched by the
workers from the providers found here.
"""

from __future__ import annotations

import trio

from hypha.data.manifest import Manifest, manifest_sha256
from hypha.errors import DataError, HyphaError
from hypha.net.host import Node
from hypha.protocol import ids
from hypha.protocol import messages as m
from hypha.scheduler.state import DatasetRef


async def discover_dataset(node: Node, name: str, timeout_seconds: float) -> tuple[DatasetRef, Manifest]:
    """Find the providers and manifest of ``name`` in the DHT (retrying until the timeout).

    The last slice is held out for the parameter server's evaluation when there are two or more.

    The manifest is taken from the first provider whose copy matches the DHT record's sha256.

    Raises:
        DataError: No matching record and manifest within ``timeout_seconds``.
    """
    key = ids.dataset_key(name)
    last = "no record"
    with trio.move_on_after(timeout_seconds):
        while True:
            try:
                record = await node.dht.get(key, m.DatasetRecord)
                providers = await node.dht.find_providers(key) if record else []
                for provider in providers:
                    try:
                        reply = await node.request(
                            provider, m.ManifestRequest(dataset=name), m.ManifestResponse
                        )
                    except HyphaError as exc:
                        last = str(exc)
                        continue
                    assert record is not None
                    if manifest_sha256(reply.manifest) != record.manifest_sha256:
                        last = f"{provider} serves a manifest that does not match the DHT record"
                        continue
                    manifest = Manifest.from_json(reply.manifest)
                    held_out = manifest.num_slices >= 2
                    ref = DatasetRef(
                        name=name,
                        num_slices=manifest.num_slices,
                        manifest_sha256=record.manifest_sha256,
                        providers=tuple(providers),
                        eval_index=manifest.num_slices - 1 if held_out else None,
                    )
                    return ref, manifest
                last = "record found but no provider answered" if record else "no record"
            except HyphaError as exc:
                last = str(exc)
            await trio.sleep(0.5)
    raise DataError(f"dataset {name!r} not found in the network within {timeout_seconds:g} s ({last})")
