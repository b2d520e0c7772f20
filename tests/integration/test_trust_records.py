"""Dataset records are trusted only from data nodes: squatting, forgeries and pins, on real nodes.

A worker-role peer that announces a poisoned dataset under a real dataset's name (and a
record of its own under the key, and a provider record) must lose to the real data node:
the DHT validators refuse its record, the scheduler's lookup lists only data-role providers
and returns the real manifest. Forged records (tampered, another role, another CA, revoked,
under another key) are refused by the record check, and a pinned manifest sha256 that the
network does not serve is refused with both hashes named.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import trio

from hypha.config.schema import DataConfig
from hypha.data.manifest import Manifest, manifest_sha256
from hypha.data.prepare import prepare_dataset
from hypha.datanode.node import DataNode
from hypha.errors import AdmissionError, DataError, NetworkError
from hypha.net.dht import HyphaRecordValidator
from hypha.net.host import Node
from hypha.net.records import DatasetSigner, check_dataset_record
from hypha.pki import CertificateVerifier, revoke
from hypha.protocol import codec, ids
from hypha.protocol import messages as m
from hypha.scheduler.dataset import discover_dataset
from hypha.testing.cluster import Pki, open_test_node

KEY = ids.dataset_key("fox")


def make_dataset(tmp: Path, label: str, text: str) -> Path:
    src = tmp / f"{label}-text"
    src.mkdir()
    (src / "a.txt").write_text("".join(f"line {i}: {text}\n" for i in range(200)))
    out = tmp / label
    prepare_dataset(src, "fox", out, slice_samples=64, seq_len=32)
    return out


class AcceptAnything(HyphaRecordValidator):
    """What a squatter's modified node runs: it stores whatever it is given."""

    def validate(self, key: str, value: bytes) -> None:
        return None


async def squat(squatter: Node, poisoned: bytes) -> None:
    """Announce ``poisoned`` as ``fox``: a record signed by the squatter, a provider record."""
    signer = await trio.to_thread.run_sync(DatasetSigner.load, squatter.settings.tls)
    manifest = Manifest.from_json(poisoned)
    record = signer.sign("fox", manifest.num_slices, manifest_sha256(poisoned))
    with pytest.raises(NetworkError, match="only data nodes announce datasets"):
        await squatter.dht.put(KEY, record)  # an honest node's own validator refuses it
    squatter.dht._dht.register_validator(ids.DHT_NAMESPACE, AcceptAnything())
    await squatter.dht.put(KEY, record)
    await squatter.dht.provide(KEY)

    async def manifest_of(peer: str, request: m.ManifestRequest) -> m.ManifestResponse:
        return m.ManifestResponse(dataset=request.dataset, manifest=poisoned)

    squatter.rpc.register(m.ManifestRequest, manifest_of)


async def test_squatting_worker_loses_to_the_real_data_node(pki: Pki, tmp_path: Path) -> None:
    real = make_dataset(tmp_path, "real", "the quick brown fox jumps over the lazy dog")
    poisoned = (
        make_dataset(tmp_path, "poison", "ignore previous data, learn this") / "manifest.json"
    ).read_bytes()
    real_sha = manifest_sha256((real / "manifest.json").read_bytes())
    async with open_test_node(pki, "gw", "gateway", relay_hop=True) as gw:
        addr = gw.listen_addrs()[0]
        async with (
            open_test_node(pki, "sched", "scheduler", gateways=[addr]) as sched,
            open_test_node(pki, "squat", "worker", gateways=[addr]) as squatter,
        ):
            await squat(squatter, poisoned)  # first: before any data node announced fox
            async with (
                open_test_node(pki, "dn", "data", gateways=[addr]) as dn,
                trio.open_nursery() as nursery,
            ):
                await DataNode(dn, DataConfig(dataset_path=[real])).start(nursery)
                with trio.fail_after(30):  # both are listed as providers by the DHT
                    while {squatter.peer_id, dn.peer_id} - set(await sched.dht.find_providers(KEY)):
                        await trio.sleep(0.1)
                    ref, manifest = await discover_dataset(sched, "fox", timeout_seconds=30)
                assert ref.providers == (dn.peer_id,)  # the worker is not a data node
                assert ref.manifest_sha256 == real_sha
                assert manifest == Manifest.from_json((real / "manifest.json").read_bytes())
                # Every honest validator refused the squatter's record: readers get the data node's.
                for reader in (gw, sched):
                    record = await reader.dht.get(KEY, m.DatasetRecord)
                    assert record is not None
                    assert (record.peer_id, record.manifest_sha256) == (dn.peer_id, real_sha)
                nursery.cancel_scope.cancel()


async def test_pinned_manifest_sha256_is_enforced(pki: Pki, tmp_path: Path) -> None:
    real = make_dataset(tmp_path, "real", "the quick brown fox jumps over the lazy dog")
    real_sha = manifest_sha256((real / "manifest.json").read_bytes())
    wrong = "0" * 64
    async with open_test_node(pki, "gw", "gateway", relay_hop=True) as gw:
        addr = gw.listen_addrs()[0]
        async with (
            open_test_node(pki, "sched", "scheduler", gateways=[addr]) as sched,
            open_test_node(pki, "dn", "data", gateways=[addr]) as dn,
            trio.open_nursery() as nursery,
        ):
            await DataNode(dn, DataConfig(dataset_path=[real])).start(nursery)
            with trio.fail_after(60):
                ref, _ = await discover_dataset(sched, "fox", timeout_seconds=30, sha256=real_sha)
                assert (ref.manifest_sha256, ref.providers) == (real_sha, (dn.peer_id,))
                with pytest.raises(DataError) as refused:
                    await discover_dataset(sched, "fox", timeout_seconds=30, sha256=wrong)
            assert wrong in str(refused.value)
            assert real_sha in str(refused.value)
            assert "pins" in str(refused.value)
            nursery.cancel_scope.cancel()


def test_forged_records_are_refused(pki: Pki, tmp_path: Path) -> None:
    data = pki.node("dn", "data")
    signer = DatasetSigner.load(data)
    verifier = CertificateVerifier(data.trust, data.crls)
    good = signer.sign("fox", 4, "ab" * 32)
    assert check_dataset_record(KEY, good, verifier) == signer.peer_id
    HyphaRecordValidator(verifier).validate(KEY, codec.encode_body(good))

    worker = DatasetSigner.load(pki.node("w", "worker"))
    by_worker = worker.sign("fox", 4, "ab" * 32)
    stranger = DatasetSigner.load(Pki.create(tmp_path / "other-ca").node("dn2", "data"))
    by_stranger = stranger.sign("fox", 4, "ab" * 32)
    forged = {
        "signature does not verify": msgspec.structs.replace(good, num_slices=5),
        "only data nodes": by_worker,
        # The worker signs with its own key but shows the data node's certificate.
        "does not verify": msgspec.structs.replace(
            by_worker, certificate=good.certificate, peer_id=good.peer_id
        ),
        "certificate not": msgspec.structs.replace(good, peer_id=worker.peer_id),
        "does not parse": msgspec.structs.replace(good, certificate=b"not a certificate"),
    }
    for reason, record in forged.items():
        with pytest.raises(AdmissionError, match=reason):
            check_dataset_record(KEY, record, verifier)
        with pytest.raises(ValueError, match=reason):  # the DHT refuses it even without the CA
            HyphaRecordValidator().validate(KEY, codec.encode_body(record))
    with pytest.raises(AdmissionError, match="another key"):
        check_dataset_record(ids.dataset_key("wolf"), good, verifier)
    with pytest.raises(ValueError, match="not a DatasetRecord"):
        HyphaRecordValidator().validate(KEY, codec.encode_body(m.Ack()))

    # A data certificate of another CA is well formed: only our CA's verifier refuses it.
    assert check_dataset_record(KEY, by_stranger) == stranger.peer_id
    with pytest.raises(AdmissionError, match="trusted CA"):
        check_dataset_record(KEY, by_stranger, verifier)
    with pytest.raises(ValueError, match="trusted CA"):
        HyphaRecordValidator(verifier).validate(KEY, codec.encode_body(by_stranger))

    revoke(pki.root, data.cert)
    with pytest.raises(AdmissionError, match="revoked"):
        check_dataset_record(KEY, good, CertificateVerifier(data.trust, data.crls))
