"""Finding a job's dataset in the network: its signed DHT record, its providers, a checked manifest.

Owns the lookup only (retrying until a deadline) and what it trusts: a ``DatasetRecord``
only when a data node of our CA signed it (the node's DHT checks that, ``net/dht.py``), a
provider only when its admitted role is ``data`` (known once connected) and it serves the
manifest the job expects: the one the job pins by sha256, else the one the verified record
names. Any peer can put records or provide keys in the DHT, so nothing else is taken from
it. The slices themselves are fetched by the workers from the providers found here.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from hypha.data.manifest import Manifest, manifest_sha256
from hypha.errors import DataError, HyphaError
from hypha.net.host import Node
from hypha.net.records import DATA_ROLE
from hypha.protocol import ids
from hypha.protocol import messages as m
from hypha.scheduler.state import DatasetRef

_RETRY_SECONDS = 0.5


@dataclass(frozen=True)
class _Served:
    """What one provider answered: its manifest bytes, or why it was not used."""

    provider: str
    manifest: bytes | None = None
    problem: str = ""
    data: bool = True
    """Whether the provider is (or may be, if unreachable) a data node."""


async def discover_dataset(
    node: Node, name: str, timeout_seconds: float, *, sha256: str | None = None
) -> tuple[DatasetRef, Manifest]:
    """Find the data-node providers and manifest of ``name`` (retrying until the timeout).

    The last slice is held out for the parameter server's evaluation when there are two or more.

    Args:
        node: the scheduler's node.
        name: the dataset name.
        timeout_seconds: how long to keep looking.
        sha256: the manifest sha256 the job pins; ``None`` trusts the signed DHT record's.

    Raises:
        DataError: No trusted record and matching manifest within ``timeout_seconds``, or
            (at once) the network serves ``name`` with another manifest than the pinned one,
            or the matching manifest is invalid.
    """
    last = "no record"
    with trio.move_on_after(timeout_seconds):
        while True:
            found = await _look_up(node, name, sha256)
            if not isinstance(found, str):
                return found
            last = found
            await trio.sleep(_RETRY_SECONDS)
    raise DataError(f"dataset {name!r} not found in the network within {timeout_seconds:g} s ({last})")


async def _look_up(node: Node, name: str, pinned: str | None) -> tuple[DatasetRef, Manifest] | str:
    """One round of the lookup: the result, or why there is none yet."""
    key = ids.dataset_key(name)
    try:
        # Checked against our CA and the current CRL by the node's DHT (net/dht.py).
        record = await node.dht.get(key, m.DatasetRecord)
        expected = pinned or (record.manifest_sha256 if record else None)
        if expected is None:
            return "no record"
        providers = await node.dht.find_providers(key)
    except HyphaError as exc:  # the DHT failed us this round, or holds a refused record
        return str(exc)
    served = await _ask_providers(node, name, providers)
    answers = [(s.provider, s.manifest) for s in served if s.manifest is not None]
    matching = [(p, data) for p, data in answers if manifest_sha256(data) == expected]
    if not matching:
        other = {manifest_sha256(data) for _, data in answers}
        if record is not None:
            other.add(record.manifest_sha256)
        other.discard(expected)
        return _no_match(name, pinned, other, served)
    manifest = Manifest.from_json(matching[0][1])
    held_out = manifest.num_slices >= 2
    ref = DatasetRef(
        name=name,
        num_slices=manifest.num_slices,
        manifest_sha256=expected,
        providers=tuple(p for p, _ in matching),
        eval_index=manifest.num_slices - 1 if held_out else None,
    )
    return ref, manifest


def _no_match(name: str, pinned: str | None, other: set[str], served: list[_Served]) -> str:
    """Why no provider serves the expected manifest, to retry on.

    Raises:
        DataError: the job pins a manifest, the network serves only ``other`` ones, and every
            data node answered (none that did not may serve the pin).
    """
    problems = "; ".join(s.problem for s in served if s.problem)
    if pinned is None or not other:
        return problems or "record found but no data node serves its manifest"
    mismatch = (
        f"the job pins manifest sha256 {pinned}, but the network's data nodes serve "
        f"{', '.join(sorted(other))}"
    )
    if any(s.problem and s.data for s in served):
        return f"{mismatch} ({problems})"  # a data node that did not answer may serve the pin
    raise DataError(f"dataset {name!r}: {mismatch}")


async def _ask_providers(node: Node, name: str, providers: list[str]) -> list[_Served]:
    """Ask every provider for its manifest, at once; peers that are not data nodes are skipped."""
    served: list[_Served] = []

    async def ask(provider: str) -> None:
        try:
            await node.ensure_connected(provider)
            role = node.directory.role(provider)  # admitted (CA-checked) when connected
            if role != DATA_ROLE:
                problem = f"{provider} is a {role} node, not a data node"
                served.append(_Served(provider, problem=problem, data=False))
                return
            reply = await node.request(provider, m.ManifestRequest(dataset=name), m.ManifestResponse)
        except HyphaError as exc:
            served.append(_Served(provider, problem=str(exc)))
            return
        served.append(_Served(provider, manifest=reply.manifest))

    async with trio.open_nursery() as nursery:
        for provider in providers:
            if provider != node.peer_id:
                nursery.start_soon(ask, provider)
    order = {p: i for i, p in enumerate(providers)}
    return sorted(served, key=lambda s: order[s.provider])
