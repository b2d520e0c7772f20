"""Shared fixtures: a throwaway PKI per test, logs of child nodes on failure."""

from __future__ import annotations

from pathlib import Path

import pytest

from hypha.testing.cluster import Pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")
