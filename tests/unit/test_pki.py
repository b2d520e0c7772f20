"""Development PKI: file modes, peer-ID binding, revocation, expiry, foreign CAs."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509

from hypha.errors import AdmissionError, ConfigError
from hypha.pki import (
    CertificateVerifier,
    check_key_matches_certificate,
    create_ca,
    issue_node,
    key_permission_problem,
    load_private_key,
    peer_id_of,
    revoke,
)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_ca_and_node_files(tmp_path: Path) -> None:
    create_ca("Acme", tmp_path)
    files = issue_node(tmp_path, "w1", "worker", tmp_path / "out")
    assert stat.S_IMODE((tmp_path / "ca-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    creds, _ = CertificateVerifier(files.trust, tmp_path / "crl.pem").verify(_cert(files.cert))
    assert creds.role == "worker"
    assert creds.name == "w1"
    assert creds.peer_id == peer_id_of(load_private_key(files.key).public_key())
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        create_ca("Acme", tmp_path)


def test_revoked_expired_and_foreign(tmp_path: Path) -> None:
    create_ca("Acme", tmp_path / "ca")
    create_ca("Evil", tmp_path / "evil")
    good = issue_node(tmp_path / "ca", "good", "scheduler", tmp_path)
    bad = issue_node(tmp_path / "ca", "bad", "worker", tmp_path)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    old = issue_node(
        tmp_path / "ca",
        "old",
        "worker",
        tmp_path,
        not_before=past,
        not_after=past + dt.timedelta(days=1),
    )
    foreign = issue_node(tmp_path / "evil", "spy", "worker", tmp_path)
    verifier = CertificateVerifier(tmp_path / "ca" / "ca-cert.pem", tmp_path / "ca" / "crl.pem")
    verifier.verify(_cert(bad.cert))
    revoke(tmp_path / "ca", bad.cert)
    with pytest.raises(AdmissionError, match="revoked"):
        verifier.verify(_cert(bad.cert))  # CRL file re-read after it changed
    verifier.verify(_cert(good.cert))
    with pytest.raises(AdmissionError, match="expired"):
        verifier.verify(_cert(old.cert))
    with pytest.raises(AdmissionError, match="trusted CA"):
        verifier.verify(_cert(foreign.cert))
    with pytest.raises(ConfigError, match="not issued by"):
        revoke(tmp_path / "ca", foreign.cert)


def test_bad_role_and_name(tmp_path: Path) -> None:
    create_ca("Acme", tmp_path)
    with pytest.raises(ConfigError, match="unknown role"):
        issue_node(tmp_path, "x", "admin", tmp_path)
    with pytest.raises(ConfigError, match="invalid node name"):
        issue_node(tmp_path, "../x", "worker", tmp_path)


def test_a_key_matches_only_its_own_certificate(tmp_path: Path) -> None:
    create_ca("Acme", tmp_path)
    a = issue_node(tmp_path, "a", "worker", tmp_path)
    b = issue_node(tmp_path, "b", "worker", tmp_path)
    check_key_matches_certificate(a.cert, a.key)
    with pytest.raises(ConfigError) as info:
        check_key_matches_certificate(a.cert, b.key)
    message = str(info.value)
    assert f"key_pem {b.key} does not belong to cert_pem {a.cert}" in message
    assert peer_id_of(load_private_key(a.key).public_key()) in message
    with pytest.raises(ConfigError, match="cannot read certificate"):
        check_key_matches_certificate(a.key, a.key)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o700])
def test_a_key_group_or_others_can_reach_is_a_problem(tmp_path: Path, mode: int) -> None:
    create_ca("Acme", tmp_path)
    files = issue_node(tmp_path, "a", "worker", tmp_path)
    assert key_permission_problem(files.key) is None
    files.key.chmod(mode)
    problem = key_permission_problem(files.key)
    if mode & 0o077:
        assert problem is not None
        assert f"(mode {mode:04o})" in problem
    else:
        assert problem is None
    assert key_permission_problem(tmp_path / "missing.pem") is None  # loading reports that


def test_keys_are_written_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        create_ca("Acme", tmp_path / "ca")
        files = issue_node(tmp_path / "ca", "a", "worker", tmp_path / "out")
    finally:
        os.umask(old)
    for key in (tmp_path / "ca" / "ca-key.pem", files.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert key_permission_problem(key) is None
    assert stat.S_IMODE(files.cert.stat().st_mode) == 0o644
