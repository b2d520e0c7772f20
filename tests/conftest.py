"""Shared fixtures: a throwaway PKI per test, logs of child nodes on failure."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hypha.testing.cluster import Pki


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread (as trainers do), restoring the count afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Nested nursery groups hide the real error: add the leaf exceptions to the report."""
    import traceback

    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and isinstance(call.excinfo.value, BaseExceptionGroup):
        text = []
        for leaf in _leaves(call.excinfo.value):
            if type(leaf).__name__ == "Cancelled":
                continue
            text.append("".join(traceback.format_exception(leaf, chain=False)[-6:]))
        report.sections.append(("leaf exceptions", "\n".join(text)))
