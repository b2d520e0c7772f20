"""Certificate admission: is this peer one of ours, which role does it have, is it bound?

Owns the checks every connection runs on the peer's leaf certificate: issued and signed by a
CA in the trust bundle, inside its validity window, not revoked by a CRL of that CA, carrying
the libp2p extension that binds the certificate to the peer's identity key, and naming a
known role. Also builds the ``ssl`` contexts of the bulk channel, which run the same checks.
It does not talk to the network; ``net/admission.py`` plugs it into py-libp2p.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from hypha.errors import AdmissionError, ConfigError
from hypha.pki.ca import LIBP2P_CERT_PREFIX, LIBP2P_EXTENSION_OID, PEER_URI_PREFIX, ROLES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerCredentials:
    """What a verified certificate says about its peer."""

    peer_id: str
    role: str
    name: str
    serial: int
    issuer: bytes
    """The DER subject of the CA that issued the certificate (CRL entries are per issuer)."""


@dataclass(frozen=True)
class TlsFiles:
    """A node's PEM files (config keys cert_pem, key_pem, trust_pem, crls_pem)."""

    cert: Path
    key: Path
    trust: Path
    crls: Path | None = None


def _load_pem_certs(path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read trust bundle {path}: {exc}") from exc
    if not certs:
        raise ConfigError(f"trust bundle {path} holds no certificate")
    return certs


class CertificateVerifier:
    """Verifies peer certificates against a trust bundle and CRLs.

    The CRL file is re-read when its modification time or size changes, so revoking a
    certificate takes effect for new connections without a restart; ``refresh_crls`` and
    ``is_revoked`` let a node find the admitted peers whose certificates a new CRL revokes.
    Each load replaces the revoked set in one assignment, so a reload in a worker thread and
    a handshake on the event loop never see half of one.
    """

    def __init__(
        self,
        trust_pem: Path,
        crls_pem: Path | None = None,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self._cas = _load_pem_certs(trust_pem)
        self._crls_path = crls_pem
        self._crls: tuple[tuple[int, int] | None, frozenset[tuple[bytes, int]]] = (None, frozenset())
        """The CRL file's (mtime in ns, size) when last loaded, and the (issuer, serial) it revokes."""
        self._now = now
        self.refresh_crls()

    def refresh_crls(self) -> None:
        """Re-read the CRL file if it changed since the last load.

        Blocking (a ``stat``, and a read when the file changed): a node's periodic check
        runs it in a worker thread.

        Raises:
            ConfigError: the file cannot be read or holds something that is not a CRL (the
                revoked set loaded before stays in force).
        """
        path = self._crls_path
        if path is None:
            return
        try:
            info = path.stat()
            stamp = (info.st_mtime_ns, info.st_size)
            if stamp == self._crls[0]:
                return
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read CRL file {path}: {exc}") from exc
        self._crls = (stamp, frozenset(self._parse_crls(path, data)))

    def is_revoked(self, creds: PeerCredentials) -> bool:
        """Whether the CRL loaded last revokes the certificate ``creds`` were read from."""
        return (creds.issuer, creds.serial) in self._crls[1]

    def _parse_crls(self, path: Path, data: bytes) -> set[tuple[bytes, int]]:
        revoked: set[tuple[bytes, int]] = set()
        blocks = [b for b in data.split(b"-----END X509 CRL-----") if b.strip()]
        for block in blocks:
            pem = block + b"-----END X509 CRL-----\n"
            try:
                crl = x509.load_pem_x509_crl(pem.strip() + b"\n")
            except ValueError as exc:
                raise ConfigError(f"{path}: not a PEM CRL: {exc}") from exc
            ca = self._issuer_of_crl(crl)
            if ca is None:
                logger.warning("ignoring CRL from unknown issuer %s in %s", crl.issuer, path)
                continue
            issuer = ca.subject.public_bytes()
            revoked.update((issuer, entry.serial_number) for entry in crl)
        return revoked

    def _issuer_of_crl(self, crl: x509.CertificateRevocationList) -> x509.Certificate | None:
        for ca in self._cas:
            if ca.subject == crl.issuer and crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
                return ca
        return None

    def _issuer_of(self, cert: x509.Certificate) -> x509.Certificate:
        for ca in self._cas:
            if ca.subject != cert.issuer:
                continue
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return ca
        raise AdmissionError(f"certificate of {_cn(cert)!r} is not signed by a trusted CA")

    def verify(self, cert: x509.Certificate) -> tuple[PeerCredentials, bytes]:
        """Verify ``cert`` and return the peer's credentials and its serialized libp2p key.

        Raises:
            AdmissionError: with a reason a person can act on.
        """
        ca = self._issuer_of(cert)
        now = self._now()
        if now < cert.not_valid_before_utc:
            raise AdmissionError(
                f"certificate of {_cn(cert)!r} is not valid before {cert.not_valid_before_utc}"
            )
        if now > cert.not_valid_after_utc:
            raise AdmissionError(f"certificate of {_cn(cert)!r} expired at {cert.not_valid_after_utc}")
        self.refresh_crls()
        issuer = ca.subject.public_bytes()
        if (issuer, cert.serial_number) in self._crls[1]:
            raise AdmissionError(f"certificate of {_cn(cert)!r} (serial {cert.serial_number:x}) is revoked")
        key_bytes, peer_id = _libp2p_binding(cert)
        uris = _peer_uris(cert)
        if uris and peer_id not in uris:
            raise AdmissionError(f"certificate of {_cn(cert)!r} names another peer ID than its key")
        roles = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        role = str(roles[0].value) if roles else ""
        if role not in ROLES:
            raise AdmissionError(f"certificate of {_cn(cert)!r} names no known role (OU={role!r})")
        creds = PeerCredentials(
            peer_id=peer_id, role=role, name=_cn(cert), serial=cert.serial_number, issuer=issuer
        )
        return creds, key_bytes


def _cn(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else "?"


def _peer_uris(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {
        uri.removeprefix(PEER_URI_PREFIX)
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier)
        if uri.startswith(PEER_URI_PREFIX)
    }


def _libp2p_binding(cert: x509.Certificate) -> tuple[bytes, str]:
    """Check the libp2p extension; return the serialized host key and its peer ID."""
    from libp2p.crypto.serialization import deserialize_public_key
    from libp2p.peer.id import ID
    from libp2p.security.tls.certificate import decode_signed_key

    try:
        ext = cert.extensions.get_extension_for_oid(LIBP2P_EXTENSION_OID).value
    except x509.ExtensionNotFound as exc:
        raise AdmissionError(f"certificate of {_cn(cert)!r} lacks the libp2p key extension") from exc
    if not isinstance(ext, x509.UnrecognizedExtension):
        raise AdmissionError("malformed libp2p key extension")
    try:
        signed = decode_signed_key(ext.value)
        host_key = deserialize_public_key(signed.public_key_bytes)
    except Exception as exc:  # the library raises assorted errors on bad DER
        raise AdmissionError(f"malformed libp2p key extension: {exc}") from exc
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if not host_key.verify(LIBP2P_CERT_PREFIX + spki, signed.signature):
        raise AdmissionError(f"certificate of {_cn(cert)!r} is not bound to its libp2p key")
    return bytes(signed.public_key_bytes), str(ID.from_pubkey(host_key).to_base58())


def bulk_ssl_context(files: TlsFiles, *, server_side: bool) -> ssl.SSLContext:
    """An ``ssl`` context for the bulk channel: TLS 1.3, mutual, CA and CRL checked by OpenSSL.

    The peer ID is checked by the caller after the handshake with ``CertificateVerifier``.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(certfile=str(files.cert), keyfile=str(files.key))
        ctx.load_verify_locations(cafile=str(files.trust))
        if files.crls is not None:
            ctx.load_verify_locations(cafile=str(files.crls))
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS files: {exc}") from exc
    return ctx
