"""Job specs: ``hypha job validate`` accepts a good spec and lists every problem of a bad one."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

import pytest

from hypha.cli.main import main
from hypha.config.job import JobSpec, ModelSection, PoolSection, load_job
from hypha.config.schema import SchedulerConfig
from hypha.config.toml import write_toml
from hypha.errors import ConfigError
from hypha.local.plan import DEMO_JOB
from hypha.scheduler.documents import check_job, train_task
from hypha.scheduler.node import run_scheduler

GOOD = """
name = "tiny"
dataset = "tiny-text"
rounds = 3
samples_per_round = 96
batch_size = 8
encoding = "int8"
fixed_inner_steps = 4
[model]
kind = "builtin"
name = "gpt"
options = { dim = 32, num_layers = 1, num_heads = 2, seq_len = 32 }
[inner]
lr = 0.001
schedule = "cosine"
[trainers]
min = 1
target = 3
"""


def test_good_spec_loads_and_validates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "job.toml"
    path.write_text(GOOD)
    spec = load_job(path)
    assert (spec.rounds, spec.encoding, spec.fixed_inner_steps, spec.trainers.target) == (3, "int8", 4, 3)
    assert (spec.outer.lr, spec.outer.momentum) == (0.7, 0.9)  # Nesterov defaults
    assert main(["job", "validate", str(path)]) == 0
    assert "is valid" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ("rounds = 0", "rounds"),
        ("fixed_inner_steps = 0", "fixed_inner_steps"),
        ('encoding = "int4"', "encoding"),
        ("bogus = 1", "bogus"),
    ],
)
def test_bad_spec_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: str, key: str
) -> None:
    field = change.split(" = ")[0]
    lines = [line for line in GOOD.splitlines() if not line.startswith(f"{field} =")]
    path = tmp_path / "job.toml"
    path.write_text(change + "\n" + "\n".join(lines))
    assert main(["job", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert key in err
    assert "Traceback" not in err


def test_missing_or_unparsable_spec_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["job", "validate", str(tmp_path / "nope.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.toml"
    broken.write_text("rounds = = 3\n")
    assert main(["job", "validate", str(broken)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def _doc() -> dict[str, Any]:
    """GOOD as a table, to change nested keys."""
    return tomllib.loads(GOOD)


def _set(doc: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    *tables, key = dotted.split(".")
    target = doc
    for table in tables:
        target = target.setdefault(table, {})
    target[key] = value
    return doc


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("inner.lr", math.nan, "inner.lr: expected a finite number, got nan"),
        ("inner.lr", math.inf, "inner.lr: expected a finite number, got inf"),
        ("inner.lr", 5.0, "inner.lr: must be > 0 and <= 1, got 5.0"),
        ("inner.beta2", 1.0, "inner.beta2: must be < 1"),
        ("outer.lr", -5.0, "outer.lr: must be > 0 and <= 10, got -5.0"),
        ("outer.momentum", 1.0, "outer.momentum: must be < 1"),
        ("eval_batches", -5, "eval_batches: must be >= 0"),
        ("report_every_seconds", 0.0, "report_every_seconds: must be > 0, got 0.0"),
        ("round_deadline_seconds", -1.0, "round_deadline_seconds: must be > 0"),
        ("rounds", 10**23, "rounds: must be >= 1 and <= 1_000_000"),
        ("seed", -1, "seed: must be >= 0"),
        ("name", "../../../x", "name: job name '../../../x' has characters other than"),
        ("name", ".hidden", "name: job name '.hidden' must not start with a dot"),
        ("dataset", "a/../../b", "dataset: dataset name"),
        ("trainers.min", 4, "trainers.min: need 0 <= min <= target"),
        ("trainers.bid", -1.0, "trainers.bid: must be >= 0"),
        ("trainers.resources.cpu", -1.0, "trainers.resources.cpu: must be >= 0"),
        ("lease_seconds", 0.0, "lease_seconds: must be > 0"),
    ],
)
def test_nonsense_is_refused_naming_the_key_and_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, value: Any, message: str
) -> None:
    path = write_toml(tmp_path / "job.toml", _set(_doc(), key, value))
    with pytest.raises(ConfigError) as info:
        load_job(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}: {message}")
    assert main(["job", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_a_warmup_longer_than_the_job_is_refused(tmp_path: Path) -> None:
    # 3 rounds x 4 fixed steps: 12 inner steps; the default warmup of 10 fits, 13 does not.
    path = write_toml(tmp_path / "job.toml", _set(_doc(), "inner.warmup_steps", 13))
    with pytest.raises(ConfigError) as info:
        load_job(path)
    assert info.value.problems == [
        f"{path}: inner.warmup_steps: 13 is more than the 12 inner steps each trainer is planned "
        "to run (rounds x inner steps per round); lower it or use schedule = 'constant'"
    ]
    # Without fixed steps, the planned share: 96 samples // (8 x 3 trainers) = 4 per round.
    doc = _set(_doc(), "inner.warmup_steps", 13)
    del doc["fixed_inner_steps"]
    with pytest.raises(ConfigError) as info:
        load_job(write_toml(tmp_path / "planned.toml", doc))
    assert "13 is more than the 12 inner steps" in info.value.problems[0]
    constant = _set(_set(_doc(), "inner.warmup_steps", 13), "inner.schedule", "constant")
    assert load_job(write_toml(tmp_path / "constant.toml", constant)).inner.warmup_steps == 13


def test_the_trainers_total_steps_are_the_specs() -> None:
    spec = JobSpec(rounds=3, samples_per_round=96, batch_size=8, trainers=PoolSection(target=3))
    assert spec.total_inner_steps == 12
    assert train_task(spec, "j", "ps").inner.total_steps == 12


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"name": "gtp"}, "model.name: unknown model 'gtp'; built-in models: gpt, mlp"),
        ({"options": {"dimm": 64}}, "model.options: unknown option 'dimm' for model 'gpt'; known: ["),
        ({"options": {"dim": 10**9, "num_heads": 1}}, "model.options: model 'gpt' is too large to build"),
        (
            {"options": {"dim": 30_000, "num_heads": 1}},
            "model.options: model 'gpt' has 21_61",  # 2 layers of 12 x dim^2, plus embeddings
        ),
        ({"options": {"num_heads": 3}}, "model.options: gpt option dim=128 must divide by num_heads=3"),
        (
            {"name": "mlp", "options": {"num_layers": 10**9}},
            "model.options: mlp option num_layers must be at most 1000",
        ),
    ],
)
def test_a_model_trainers_cannot_build_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model: dict[str, Any], message: str
) -> None:
    doc = _doc()
    doc["model"] = {"kind": "builtin", "name": "gpt", **model}
    path = write_toml(tmp_path / "job.toml", doc)
    assert main(["job", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: {message}" in err
    assert "Traceback" not in err


async def test_the_scheduler_refuses_the_job_before_its_node_starts(tmp_path: Path) -> None:
    spec = JobSpec(model=ModelSection(name="mlp", options={"dimm": 64.0}))
    # The config names files that do not exist: the check must come before the node opens them.
    with pytest.raises(ConfigError) as info:
        await run_scheduler(SchedulerConfig(cert_pem=tmp_path / "none.pem"), spec)
    assert info.value.problems[0].startswith("job job: model.options: unknown option 'dimm'")


def test_the_demo_job_validates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_toml(tmp_path / "demo.toml", DEMO_JOB)
    assert main(["job", "validate", str(path)]) == 0
    assert "-parameter model)" in capsys.readouterr().err
    assert check_job(load_job(path), str(path)) > 0
