"""Job specs: ``hypha job validate`` accepts a good spec and lists every problem of a bad one."""

from __future__ import annotations

from pathlib import Path

import pytest

from hypha.cli.main import main
from hypha.config.job import load_job

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
