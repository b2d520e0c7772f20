"""A development PKI for a network on one machine: one CA that issues node credentials.

Owns the CA directory of a local run (``hypha up``, tests, benchmarks) and turning a node's
issued files into the four config keys every role reads. Certificates themselves are made
by ``hypha.pki``; this module only decides where they go.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypha.pki import TlsFiles, create_ca, issue_node


@dataclass
class Pki:
    """A development CA in ``root`` that issues node credentials on demand."""

    root: Path

    @classmethod
    def create(cls, root: Path, org: str = "Test") -> Pki:
        """Create a fresh CA (certificate, key and empty CRL) in ``root``."""
        create_ca(org, root)
        return cls(root)

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"

    def node(self, name: str, role: str, **kwargs: Any) -> TlsFiles:
        """Issue a key and certificate for node ``name`` in ``role`` (kwargs go to ``issue_node``)."""
        files = issue_node(self.root, name, role, self.root, **kwargs)
        return TlsFiles(cert=files.cert, key=files.key, trust=files.trust, crls=self.crl)

    def config_keys(self, tls: TlsFiles) -> dict[str, Any]:
        """The ``cert_pem``/``key_pem``/``trust_pem``/``crls_pem`` keys of a node's config."""
        return {
            "cert_pem": str(tls.cert),
            "key_pem": str(tls.key),
            "trust_pem": str(tls.trust),
            "crls_pem": str(tls.crls or self.crl),
        }
