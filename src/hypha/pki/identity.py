"""A node's own identity files: do its key and certificate belong together, is the key private?

Owns the start-up checks of ``cert_pem`` and ``key_pem``: the private key must be the one the
certificate was issued for (else every handshake fails later with a key mismatch), and the
key file must not be accessible to group or others (anyone who reads it can be this node).
Loading the files is ``pki/ca.py``'s; checking peers' certificates is ``pki/verify.py``'s.
"""

from __future__ import annotations

import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from hypha.errors import ConfigError
from hypha.pki.ca import load_certificate, load_private_key, peer_id_of

INSECURE_KEY_BITS = 0o077
"""Mode bits of a key file that let anyone but its owner read, write or run it."""


def check_key_matches_certificate(cert_path: Path, key_path: Path) -> None:
    """Refuse a private key that is not the one ``cert_path`` was issued for.

    Raises:
        ConfigError: Either file is unreadable, or the key's public half is not the
            certificate's subject key (the message names both files and both peer IDs).
    """
    key = load_private_key(key_path)
    cert_public = load_certificate(cert_path).public_key()
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if cert_public.public_bytes(der, spki) == key.public_key().public_bytes(der, spki):
        return
    cert_peer = peer_id_of(cert_public) if isinstance(cert_public, ed25519.Ed25519PublicKey) else "?"
    raise ConfigError(
        f"key_pem {key_path} does not belong to cert_pem {cert_path}: the certificate is for peer "
        f"{cert_peer}, the key is peer {peer_id_of(key.public_key())}; "
        "configure the key that was issued with this certificate"
    )


def key_permission_problem(key_path: Path) -> str | None:
    """Why ``key_path`` is not private enough (group or others may access it), or None.

    A file that cannot be read at all is not this check's concern (loading it reports that).
    """
    try:
        mode = stat.S_IMODE(key_path.stat().st_mode)
    except OSError:
        return None
    if mode & INSECURE_KEY_BITS == 0:
        return None
    return (
        f"key_pem: {key_path} is accessible by group or others (mode {mode:04o}); "
        f"run 'chmod 600 {key_path}', or set allow_insecure_key_permissions = true"
    )
