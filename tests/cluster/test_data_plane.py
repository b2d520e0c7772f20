"""Data plane with real nodes: two data nodes, failover when one dies, corrupted slices."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio

from hypha.data.cache import SliceRef
from hypha.data.manifest import load_manifest, slice_path
from hypha.data.prepare import prepare_dataset
from hypha.errors import RemoteError
from hypha.protocol import ids
from hypha.protocol import messages as m
from hypha.testing.cluster import Pki, open_test_node, spawn_node, worker_config, write_toml
from hypha.worker import run_worker

pytestmark = pytest.mark.cluster


def make_dataset(tmp: Path, slices: int = 8) -> Path:
    src = tmp / "text"
    src.mkdir()
    (src / "a.txt").write_text(
        "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(400))
    )
    out = tmp / "dataset"
    manifest = prepare_dataset(src, "fox", out, slice_samples=64, seq_len=32)
    assert manifest.num_slices >= slices
    return out


def data_toml(pki: Pki, tmp: Path, name: str, gateway: str, dataset: Path) -> Path:
    keys = pki.config_keys(pki.node(name, "data"))
    return write_toml(
        tmp / f"{name}.toml",
        {**keys, "gateway_addresses": [gateway], "relay_circuit": False, "dataset_path": [str(dataset)]},
    )


async def test_two_data_nodes_failover_and_corruption(pki: Pki, tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path)
    manifest = load_manifest(dataset)
    copy1, copy2 = tmp_path / "copy1", tmp_path / "copy2"
    shutil.copytree(dataset, copy1)
    shutil.copytree(dataset, copy2)
    corrupted = 2
    with slice_path(copy2, corrupted).open("r+b") as f:  # data node 2 holds one damaged slice
        f.seek(200)
        f.write(b"\xff\xfe\xfd\xfc")
    async with open_test_node(pki, "gw", "gateway", relay_hop=True) as gw, trio.open_nursery() as nursery:
        addr = gw.listen_addrs()[0]
        async with (
            spawn_node(
                ["data", "--config", str(data_toml(pki, tmp_path, "dn1", addr, copy1))], tmp_path, "dn1"
            ) as dn1,
            spawn_node(
                ["data", "--config", str(data_toml(pki, tmp_path, "dn2", addr, copy2))], tmp_path, "dn2"
            ) as dn2,
        ):
            config = worker_config(pki, "w", addr, tmp_path, cache_slices=64)
            worker = await nursery.start(lambda task_status: run_worker(config, task_status=task_status))
            node = worker.node
            with trio.fail_after(30):
                while len(await node.dht.find_providers(ids.dataset_key("fox"))) < 2:
                    await trio.sleep(0.2)
                record = await node.dht.get(ids.dataset_key("fox"), m.DatasetRecord)
            assert record is not None
            assert record.num_slices == manifest.num_slices
            # Unknown datasets and out-of-range indexes are refused with a clear error.
            with pytest.raises(RemoteError, match="unknown dataset"):
                await node.request(dn1.peer_id, m.SliceRequest(dataset="nope", index=0), m.TensorOffer)
            with pytest.raises(RemoteError, match="out of range"):
                await node.request(dn1.peer_id, m.SliceRequest(dataset="fox", index=10_000), m.TensorOffer)

            transfers = worker.transfers
            order = [dn2.peer_id, dn1.peer_id]  # the corrupted provider first
            refs = [SliceRef(dataset="fox", index=i, sha256=s.sha256) for i, s in enumerate(manifest.slices)]
            for ref in refs:
                transfers.set_providers(ref, order)
            with trio.fail_after(60):
                # The corrupted slice comes from dn2 first: detected, fetched again from dn1.
                path = await transfers.cache.get(refs[corrupted])
                assert path.read_bytes() == slice_path(dataset, corrupted).read_bytes()
                for ref in refs[:4]:
                    await transfers.cache.get(ref)
                dn2.kill()  # a data node dies mid-run: the rest fails over to dn1
                for ref in refs[4:]:
                    await transfers.cache.get(ref)
                for ref in refs:  # everything cached exactly once, nothing refetched
                    await transfers.cache.get(ref)
            stats = transfers.cache.statistics()
            assert stats.num_cached == manifest.num_slices
            assert stats.fetches == manifest.num_slices  # one fetch per slice, failover inside it
            assert stats.hits >= manifest.num_slices
            assert stats.verify_failures == 0  # bad bytes never reached the cache
            assert all(transfers.cache.contains(ref) for ref in refs)
            assert transfers.bulk.statistics().num_failed >= 1  # the corrupted transfer
            nursery.cancel_scope.cancel()
