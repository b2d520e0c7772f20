"""Admission of peers: py-libp2p's TLS transport, restricted to our CA.

Owns the only security transport a Hypha host offers (``/tls/1.0.0``). It presents the
node's CA-signed certificate instead of the library's self-signed one, and replaces the
library's self-signed-only check with ``pki.verify.CertificateVerifier``: trust bundle, CRL,
validity window, libp2p key binding and role. Refusals are logged on the accepting side with
the reason and raised as ``AdmissionError`` on the dialing side. It also remembers the
credentials of every admitted peer (``PeerDirectory``), so that handlers can authorise by
role, and finds the admitted peers whose certificates a changed CRL revokes
(``newly_revoked``); cutting their connections is the node's (``host.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from libp2p.abc import IRawConnection, ISecureConn
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.peer.id import ID
from libp2p.security.tls.transport import TLSTransport

from hypha.errors import AdmissionError
from hypha.pki.verify import CertificateVerifier, PeerCredentials, TlsFiles

logger = logging.getLogger(__name__)


class PeerDirectory:
    """Credentials of every peer admitted since start, by peer ID, and which are revoked.

    A peer stays revoked until it is admitted again, which takes a certificate the CRL does
    not revoke (a re-issued one): the handshake refuses the revoked one.
    """

    def __init__(self) -> None:
        self._peers: dict[str, PeerCredentials] = {}
        self._revoked: set[str] = set()

    def add(self, creds: PeerCredentials) -> None:
        self._peers[creds.peer_id] = creds
        self._revoked.discard(creds.peer_id)

    def get(self, peer_id: str) -> PeerCredentials | None:
        return self._peers.get(peer_id)

    def role(self, peer_id: str) -> str | None:
        """The admitted peer's role; None for a peer never admitted or since revoked."""
        creds = self._peers.get(peer_id)
        return creds.role if creds and peer_id not in self._revoked else None

    def mark_revoked(self, peer_id: str) -> None:
        """Refuse ``peer_id`` from now on (``is_revoked``) until it is admitted again."""
        self._revoked.add(peer_id)

    def is_revoked(self, peer_id: str) -> bool:
        return peer_id in self._revoked

    def admitted(self) -> list[PeerCredentials]:
        """The credentials of every admitted peer not marked revoked."""
        return [c for p, c in self._peers.items() if p not in self._revoked]

    def __len__(self) -> int:
        return len(self._peers)


@dataclass(frozen=True, slots=True)
class AdmissionStatistics:
    """Counters of an ``AdmissionTransport`` since start."""

    num_admitted: int
    """Distinct peers whose certificate passed verification (either direction)."""
    num_refused_inbound: int
    num_refused_outbound: int


class AdmissionTransport(TLSTransport):
    """TLS 1.3 security transport that admits only peers certified by our CA.

    Args:
        key_pair: the node's libp2p identity key.
        files: the node's certificate and key, which it presents.
        directory: where admitted peers' credentials are kept.
        verifier: the node's verifier, which every peer's certificate must pass.
    """

    def __init__(
        self, key_pair: KeyPair, files: TlsFiles, directory: PeerDirectory, verifier: CertificateVerifier
    ) -> None:
        super().__init__(key_pair)
        self._cert_pem = Path(files.cert).read_text()
        self._key_pem = Path(files.key).read_text()
        self._verifier = verifier
        self._directory = directory
        self.refusals: dict[str, str] = {}
        """Why the last outbound handshake to a peer was refused (for the dialer's error)."""
        self._num_refused_inbound = 0
        self._num_refused_outbound = 0

    def statistics(self) -> AdmissionStatistics:
        """Return a snapshot of admitted peers and refused handshakes."""
        return AdmissionStatistics(
            num_admitted=len(self._directory),
            num_refused_inbound=self._num_refused_inbound,
            num_refused_outbound=self._num_refused_outbound,
        )

    def newly_revoked(self) -> list[str]:
        """Mark revoked, and return, the admitted peers whose certificates the CRL revokes.

        Checks against the CRL the node's verifier loaded last (by ``refresh_crls``, a
        handshake or a record check); a peer is returned once per revocation.
        """
        revoked = [c.peer_id for c in self._directory.admitted() if self._verifier.is_revoked(c)]
        for peer_id in revoked:
            self._directory.mark_revoked(peer_id)
        return revoked

    def _extract_public_key_from_cert(self, cert: x509.Certificate) -> Any:
        creds, key_bytes = self._verifier.verify(cert)
        self._directory.add(creds)
        return deserialize_public_key(key_bytes)

    async def secure_inbound(self, conn: IRawConnection) -> ISecureConn:
        try:
            return await super().secure_inbound(conn)
        except AdmissionError as exc:
            self._num_refused_inbound += 1
            logger.warning("refused inbound connection from %s: %s", _remote(conn), exc)
            raise
        except Exception as exc:
            self._num_refused_inbound += 1
            logger.warning("refused inbound connection from %s: TLS handshake failed: %s", _remote(conn), exc)
            raise AdmissionError(f"TLS handshake failed: {exc}") from exc

    async def secure_outbound(self, conn: IRawConnection, peer_id: ID) -> ISecureConn:
        try:
            return await super().secure_outbound(conn, peer_id)
        except AdmissionError as exc:
            self._num_refused_outbound += 1
            logger.warning("refused connection to %s: %s", peer_id, exc)
            self.refusals[str(peer_id)] = str(exc)
            raise
        except Exception as exc:
            self._num_refused_outbound += 1
            logger.warning("refused connection to %s: TLS handshake failed: %s", peer_id, exc)
            self.refusals[str(peer_id)] = f"TLS handshake failed: {exc}"
            raise AdmissionError(f"TLS handshake with {peer_id} failed: {exc}") from exc


def _remote(conn: IRawConnection) -> str:
    try:
        addr = conn.get_remote_address()
    except Exception:  # some raw connections do not know it
        return "unknown address"
    return f"{addr[0]}:{addr[1]}" if addr else "unknown address"
