"""Development PKI (``hypha certutil``) and certificate verification."""

from hypha.pki.ca import (
    ROLES,
    NodeFiles,
    create_ca,
    issue_node,
    load_private_key,
    peer_id_of,
    revoke,
)
from hypha.pki.verify import CertificateVerifier, PeerCredentials, TlsFiles, bulk_ssl_context

__all__ = [
    "ROLES",
    "CertificateVerifier",
    "NodeFiles",
    "PeerCredentials",
    "TlsFiles",
    "bulk_ssl_context",
    "create_ca",
    "issue_node",
    "load_private_key",
    "peer_id_of",
    "revoke",
]
