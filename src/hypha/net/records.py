"""Signed dataset records: proof that a data node of our CA announced a dataset.

Owns the canonical bytes a data node signs for its ``DatasetRecord`` (key, name, slice
count, manifest sha256, peer ID), signing them with the node's Ed25519 identity key, and
checking a record. The check has two depths: without a ``CertificateVerifier`` it is
structural (the record sits under its own name's key, the certificate's key is the
announcer's peer ID and signed the record, the certificate names the data role), which any
DHT node can run on store; with one it also checks that the certificate chains to our CA,
is inside its validity window and is not revoked, which every reader runs before trusting a
record. It does not touch the DHT (``net/dht.py``) or decide which providers to use.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from hypha.errors import AdmissionError
from hypha.pki.ca import load_certificate, load_private_key, peer_id_of
from hypha.pki.verify import CertificateVerifier, TlsFiles
from hypha.protocol import ids
from hypha.protocol import messages as m

DATA_ROLE = "data"
"""The only role whose records are accepted under ``/hypha/dataset/``."""

_DOMAIN = "hypha/dataset-record/1"
"""Signed in front of every payload, so a dataset signature means nothing anywhere else."""


def dataset_payload(key: str, name: str, num_slices: int, manifest_sha256: str, peer_id: str) -> bytes:
    """The canonical bytes a data node signs: a msgpack array (deterministic for these types)."""
    return msgspec.msgpack.encode([_DOMAIN, key, name, num_slices, manifest_sha256, peer_id])


@dataclass(frozen=True)
class DatasetSigner:
    """A data node's identity key and certificate, for signing its dataset records.

    Build it with ``load`` (blocking: it reads the key and certificate files).
    """

    key: ed25519.Ed25519PrivateKey
    certificate: bytes
    """DER bytes of the node's CA-signed certificate."""
    peer_id: str

    @classmethod
    def load(cls, tls: TlsFiles) -> DatasetSigner:
        """Read the node's key and certificate.

        The key must be the certificate's: ``open_node`` refuses to start a node whose files
        do not match (``pki.identity.check_key_matches_certificate``), so this does not check
        again; a mismatched pair would sign records that every reader refuses.

        Raises:
            ConfigError: unreadable key or certificate.
        """
        key = load_private_key(tls.key)
        cert = load_certificate(tls.cert)
        peer_id = peer_id_of(key.public_key())
        return cls(key=key, certificate=cert.public_bytes(serialization.Encoding.DER), peer_id=peer_id)

    def sign(self, name: str, num_slices: int, manifest_sha256: str) -> m.DatasetRecord:
        """Return the signed record of one dataset, for the key ``ids.dataset_key(name)``."""
        key = ids.dataset_key(name)
        payload = dataset_payload(key, name, num_slices, manifest_sha256, self.peer_id)
        return m.DatasetRecord(
            name=name,
            num_slices=num_slices,
            manifest_sha256=manifest_sha256,
            peer_id=self.peer_id,
            certificate=self.certificate,
            signature=self.key.sign(payload),
        )


def check_dataset_record(
    key: str, record: m.DatasetRecord, verifier: CertificateVerifier | None = None
) -> str:
    """Check that a data node of our network signed ``record`` for ``key``; return its peer ID.

    Args:
        key: the DHT key the record was stored or found under.
        record: the record.
        verifier: our CA's verifier; without it the check is only structural (a certificate
            from another CA passes), so readers must pass one.

    Raises:
        AdmissionError: with the reason the record is refused.
    """
    if key != ids.dataset_key(record.name):
        raise AdmissionError(f"record for dataset {record.name[:40]!r} stored under another key ({key})")
    try:
        cert = x509.load_der_x509_certificate(record.certificate)
    except ValueError as exc:
        raise AdmissionError(f"record for {record.name!r}: certificate does not parse: {exc}") from exc
    if verifier is not None:
        creds, _ = verifier.verify(cert)  # CA chain, validity, CRL, libp2p binding
        role, peer_id = creds.role, creds.peer_id
    else:
        roles = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        role, peer_id = (str(roles[0].value) if roles else ""), _subject_peer_id(cert)
    if role != DATA_ROLE:
        who = f"a {role} peer" if role else "a peer without a role"
        raise AdmissionError(f"record for {record.name!r} by {who}: only data nodes announce datasets")
    # The subject key signs the record; without a verifier, peer_id was derived from it already.
    subject = _subject_peer_id(cert) if verifier is not None else peer_id
    if peer_id != record.peer_id or subject != record.peer_id:
        raise AdmissionError(f"record for {record.name!r} names peer {record.peer_id}, its certificate not")
    public = cert.public_key()
    assert isinstance(public, ed25519.Ed25519PublicKey)  # _subject_peer_id checked it
    payload = dataset_payload(key, record.name, record.num_slices, record.manifest_sha256, record.peer_id)
    try:
        public.verify(record.signature, payload)
    except InvalidSignature:
        raise AdmissionError(f"record for {record.name!r}: the signature does not verify") from None
    return record.peer_id


def _subject_peer_id(cert: x509.Certificate) -> str:
    """The peer ID of the certificate's subject key (a node's Ed25519 identity key)."""
    public = cert.public_key()
    if not isinstance(public, ed25519.Ed25519PublicKey):
        raise AdmissionError("certificate key is not Ed25519")
    return peer_id_of(public)
