"""Development certificate authority: the files ``hypha certutil`` writes.

Owns key generation, CA creation, node certificate issue and revocation (CRL updates).
A node certificate is signed directly by the CA, carries the node's Ed25519 identity key as
its subject key, names the node's role in the subject's OU, names its libp2p peer ID in a
SAN URI ``libp2p:peer:<id>`` and carries the libp2p TLS extension that binds the
certificate to that key. Verification lives in ``pki/verify.py``.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hypha.errors import ConfigError

ROLES: Final = ("gateway", "scheduler", "worker", "data")
CA_CERT: Final = "ca-cert.pem"
CA_KEY: Final = "ca-key.pem"
CRL: Final = "crl.pem"

LIBP2P_EXTENSION_OID: Final = x509.ObjectIdentifier("1.3.6.1.4.1.53594.1.1")
LIBP2P_CERT_PREFIX: Final = b"libp2p-tls-handshake:"
PEER_URI_PREFIX: Final = "libp2p:peer:"


@dataclass(frozen=True)
class NodeFiles:
    """Paths of one node's credentials."""

    cert: Path
    key: Path
    trust: Path


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` atomically with ``mode`` (keys 0600, public files 0644)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _key_pem(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """Load a PKCS#8 PEM Ed25519 key, with a clear error for anything else."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read private key {path}: {exc}") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path}: key must be Ed25519 (PKCS#8 PEM)")
    return key


def load_certificate(path: Path) -> x509.Certificate:
    """Load the first certificate of a PEM file."""
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())[0]
    except (OSError, ValueError, IndexError) as exc:
        raise ConfigError(f"cannot read certificate {path}: {exc}") from exc


def peer_id_of(public_key: ed25519.Ed25519PublicKey) -> str:
    """Return the libp2p peer ID (base58) of an Ed25519 public key."""
    from libp2p.crypto.ed25519 import Ed25519PublicKey as Libp2pEd25519
    from libp2p.peer.id import ID

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return str(ID.from_pubkey(Libp2pEd25519.from_bytes(raw)).to_base58())


def create_ca(org: str, out: Path, *, days: int = 3650) -> Path:
    """Write ``ca-cert.pem``, ``ca-key.pem`` (0600) and an empty ``crl.pem`` into ``out``."""
    if (out / CA_KEY).exists():
        raise ConfigError(f"{out / CA_KEY} already exists; refusing to overwrite a CA key")
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{org} Hypha CA"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, None)
    )
    _write(out / CA_KEY, _key_pem(key), 0o600)
    _write(out / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_crl(out, key, cert, [])
    return out


def _write_crl(
    ca_dir: Path,
    ca_key: ed25519.Ed25519PrivateKey,
    ca_cert: x509.Certificate,
    revoked: list[x509.RevokedCertificate],
) -> None:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=365))
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca_key, None)
    _write(ca_dir / CRL, crl.public_bytes(serialization.Encoding.PEM), 0o644)


def issue_node(
    ca_dir: Path,
    name: str,
    role: str,
    out: Path,
    *,
    days: int = 365,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> NodeFiles:
    """Create a node key and a CA-signed certificate bound to its peer ID.

    Args:
        ca_dir: directory holding ``ca-cert.pem`` and ``ca-key.pem``.
        name: node name; files are ``NAME-key.pem``, ``NAME-cert.pem``, ``NAME-trust.pem``.
        role: one of ``gateway``, ``scheduler``, ``worker``, ``data``.
        out: output directory.
        days: validity from now (ignored when ``not_after`` is given).
        not_before, not_after: explicit validity window (tests use an expired one).

    Raises:
        ConfigError: unknown role, bad name, or unreadable CA files.
    """
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"invalid node name {name!r}")
    ca_key = load_private_key(ca_dir / CA_KEY)
    ca_cert = load_certificate(ca_dir / CA_CERT)
    key = ed25519.Ed25519PrivateKey.generate()
    public = key.public_key()
    peer_id = peer_id_of(public)
    spki = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    signed_key = _signed_key_der(public, key.sign(LIBP2P_CERT_PREFIX + spki))
    org = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
    attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, str(org[0].value)))
    now = dt.datetime.now(dt.UTC)
    start = not_before or now - dt.timedelta(days=1)
    end = not_after or now + dt.timedelta(days=days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"{PEER_URI_PREFIX}{peer_id}")]),
            critical=False,
        )
        .add_extension(x509.UnrecognizedExtension(LIBP2P_EXTENSION_OID, signed_key), critical=False)
        .sign(ca_key, None)
    )
    files = NodeFiles(
        cert=out / f"{name}-cert.pem", key=out / f"{name}-key.pem", trust=out / f"{name}-trust.pem"
    )
    _write(files.key, _key_pem(key), 0o600)
    _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(files.trust, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return files


def _signed_key_der(public: ed25519.Ed25519PublicKey, signature: bytes) -> bytes:
    """DER ``SignedKey{publicKey, signature}`` as the libp2p TLS spec defines it."""
    from libp2p.crypto.ed25519 import Ed25519PublicKey as Libp2pEd25519
    from libp2p.security.tls.certificate import encode_signed_key

    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return bytes(encode_signed_key(Libp2pEd25519.from_bytes(raw).serialize(), signature))


def revoke(ca_dir: Path, cert_path: Path) -> int:
    """Add the certificate at ``cert_path`` to the CA's ``crl.pem``; return its serial."""
    ca_key = load_private_key(ca_dir / CA_KEY)
    ca_cert = load_certificate(ca_dir / CA_CERT)
    cert = load_certificate(cert_path)
    if cert.issuer != ca_cert.subject:
        raise ConfigError(f"{cert_path} was not issued by the CA in {ca_dir}")
    existing: list[x509.RevokedCertificate] = []
    crl_path = ca_dir / CRL
    if crl_path.exists():
        crl = x509.load_pem_x509_crl(crl_path.read_bytes())
        existing = list(crl)
    if any(entry.serial_number == cert.serial_number for entry in existing):
        return cert.serial_number
    entry = (
        x509.RevokedCertificateBuilder()
        .serial_number(cert.serial_number)
        .revocation_date(dt.datetime.now(dt.UTC))
        .build()
    )
    _write_crl(ca_dir, ca_key, ca_cert, [*existing, entry])
    return cert.serial_number
