"""Config loading: TOML, environment, flags; every problem named with its key and file."""

from __future__ import annotations

from pathlib import Path

import pytest

from hypha.config import GatewayConfig, WorkerConfig, load_config, render_default
from hypha.config.load import load_identity
from hypha.errors import ConfigError


@pytest.mark.parametrize("role", ["gateway", "worker", "scheduler", "data"])
def test_init_output_loads_back(tmp_path: Path, role: str) -> None:
    path = tmp_path / f"{role}.toml"
    path.write_text(render_default(role, "n1"))
    config = load_config(role, path, environ={})
    assert config.cert_pem == tmp_path / "n1-cert.pem"  # relative to the file


def test_layers_env_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "w.toml"
    path.write_text(
        'work_dir = "/srv/a"\nlisten_addresses = ["/ip4/127.0.0.1/tcp/1"]\n[offer]\nprice = 3.0\n'
    )
    env = {
        "HYPHA_WORK_DIR": "/srv/b",
        "HYPHA_LISTEN_ADDRESSES": "/ip4/127.0.0.1/tcp/2,/ip4/127.0.0.1/tcp/3",
    }
    config = load_config(
        "worker", path, environ=env, overrides={"listen_addresses": ["/ip4/127.0.0.1/tcp/4"]}
    )
    assert isinstance(config, WorkerConfig)
    assert config.work_dir == Path("/srv/b")
    assert config.listen_addresses == ["/ip4/127.0.0.1/tcp/4"]
    assert config.offer.price == 3.0


def test_every_problem_is_reported_with_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        'listen_addresses = 5\ncolour = "blue"\nrelay_circuit = "yes"\n'
        '[offer]\nstrategy = "greedy"\nprice = "cheap"\n'
        '[[executors]]\nclass = "train"\nname = "x"\nruntime = "process"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config("worker", path, environ={})
    problems = info.value.problems
    assert all(p.startswith(str(path)) for p in problems)
    text = "\n".join(problems)
    for key in (
        "listen_addresses",
        "colour: unknown key",
        "relay_circuit",
        "offer.strategy",
        "offer.price",
        "cmd",
    ):
        assert key in text


def test_env_values_are_type_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="problem") as info:
        load_config(
            "worker",
            None,
            environ={"HYPHA_RELAY_CIRCUIT": "maybe", "HYPHA_RPC_TIMEOUT_SECONDS": "soon"},
        )
    assert any("relay_circuit" in p for p in info.value.problems)
    assert any("rpc_timeout_seconds" in p for p in info.value.problems)


def test_gateway_needs_a_listen_address() -> None:
    with pytest.raises(ConfigError, match="problem"):
        load_config("gateway", None, overrides={"listen_addresses": []}, environ={})
    assert isinstance(load_config("gateway", None, environ={}), GatewayConfig)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("worker", tmp_path / "nope.toml", environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("listen_addresses = [\n")
    with pytest.raises(ConfigError, match=r"broken\.toml"):
        load_config("worker", broken, environ={})
    ident = tmp_path / "any.toml"
    ident.write_text('cert_pem = "c.pem"\nwork_dir = "/x"\n')
    assert load_identity(ident).cert_pem == tmp_path / "c.pem"
