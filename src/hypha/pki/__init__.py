"""Development PKI (``hypha certutil``), checks of a node's own key and certificate, and
certificate verification."""

from hypha.pki.ca import (
    ROLES,
    NodeFiles,
    create_ca,
    issue_node,
    load_private_key,
    peer_id_of,
    revoke,
)
from hypha.pki.identity import check_key_matches_certificate, key_permission_problem
from hypha.pki.verify import CertificateVerifier, PeerCredentials, TlsFiles, bulk_ssl_context

__all__ = [
    "ROLES",
    "CertificateVerifier",
    "NodeFiles",
    "PeerCredentials",
    "TlsFiles",
    "bulk_ssl_context",
    "check_key_matches_certificate",
    "create_ca",
    "issue_node",
    "key_permission_problem",
    "load_private_key",
    "peer_id_of",
    "revoke",
]
