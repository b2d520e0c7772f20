"""The parameter server's check of a received update's contents, on a real model's tensors.

An update that passed authorization (a trainer of the plan, a bounded sample count) may still
be garbage: it must decode, name the model's parameters with their shapes, and hold finite
floats, or the outer step would be poisoned (inf, nan) or crash (a shape mismatch).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hypha.protocol.tasks import AggregateTask, ModelDoc, OuterDoc
from hypha.training.compress import save_tensors_file
from hypha.worker.executors.aggregate_maths import OuterMaths

MODEL = ModelDoc(kind="builtin", name="mlp", options={"input_dim": 4, "hidden_dim": 8, "num_classes": 3})


@pytest.fixture
def maths(tmp_path: Path) -> OuterMaths:
    return OuterMaths(AggregateTask(job_id="j", model=MODEL, seed=0, outer=OuterDoc(), rounds=1), tmp_path)


def write(tmp_path: Path, tensors: dict[str, torch.Tensor], encoding: str = "fp32") -> Path:
    path = tmp_path / "update.safetensors"
    save_tensors_file(path, tensors, encoding)  # type: ignore[arg-type]
    return path


def zeros(maths: OuterMaths) -> dict[str, torch.Tensor]:
    return {n: torch.zeros_like(p) for n, p in maths.params.items()}


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8"])
def test_an_update_of_the_models_shape_is_taken(maths: OuterMaths, tmp_path: Path, encoding: str) -> None:
    path = write(tmp_path, {n: torch.randn_like(t) for n, t in zeros(maths).items()}, encoding)
    assert maths.check_update(path) == ""
    assert path.stat().st_size <= maths.max_update_bytes


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_value_is_refused(maths: OuterMaths, tmp_path: Path, bad: float) -> None:
    tensors = zeros(maths)
    name = sorted(tensors)[-1]
    tensors[name].view(-1)[0] = bad
    assert maths.check_update(write(tmp_path, tensors)) == f"{name} holds non-finite values"


def test_a_missing_or_misshapen_parameter_is_refused(maths: OuterMaths, tmp_path: Path) -> None:
    tensors = zeros(maths)
    first = sorted(tensors)[0]
    del tensors[first]
    assert "parameters differ" in maths.check_update(write(tmp_path, tensors))
    tensors = zeros(maths)
    tensors[first] = torch.zeros(7)
    assert "has shape (7,)" in maths.check_update(write(tmp_path, tensors))


def test_a_file_that_is_not_tensors_is_refused(maths: OuterMaths, tmp_path: Path) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\xff" * 64)
    assert maths.check_update(path).startswith("not a readable tensor file")
