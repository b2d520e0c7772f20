"""Config loading: TOML, environment, flags; every problem named with its key and file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hypha.cli.main import main
from hypha.config import GatewayConfig, WorkerConfig, build_section, check_files, load_config, render_default
from hypha.config.load import load_identity
from hypha.errors import ConfigError
from hypha.pki import load_private_key, peer_id_of
from hypha.testing.cluster import Pki, write_toml


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


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("rpc_timeout_seconds = nan", "rpc_timeout_seconds"),
        ("offer_window_seconds = inf", "offer_window_seconds"),
        ("[offer]\nprice = -inf", "offer.price"),
        ("[resources]\ncpu = nan", "resources.cpu"),
    ],
)
def test_non_finite_numbers_are_refused(tmp_path: Path, line: str, key: str) -> None:
    path = tmp_path / "w.toml"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError) as info:
        load_config("worker", path, environ={})
    assert info.value.problems == [f"{path}: {key}: expected a finite number, got {line.split(' = ')[1]}"]


def test_non_finite_numbers_from_the_environment_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("scheduler", None, environ={"HYPHA_RPC_TIMEOUT_SECONDS": "nan"})
    assert info.value.problems == ["<defaults>: rpc_timeout_seconds: expected a finite number, got nan"]


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ({"rpc_timeout_seconds": 0.0}, "rpc_timeout_seconds: must be positive"),
        ({"resources": {"memory": -1.0}}, "resources.memory: must not be negative"),
        ({"offer": {"floor": -0.5}}, "offer.floor: must not be negative"),
        ({"throttle": 0.5}, "throttle: must be at least 1"),
    ],
)
def test_node_ranges_name_the_key(raw: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_section(WorkerConfig, raw, where="w.toml")
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"w.toml: {problem}")


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("listen_addresses", "garbage", "is not a multiaddr"),
        ("listen_addresses", "/ip4/127.0.0.1/tcp/99999", "is not a multiaddr"),
        ("listen_addresses", "", "is not a multiaddr"),
        ("listen_addresses", "/ip4/127.0.0.1", "must name an IP address and a TCP port"),
        ("external_addresses", "/ip4/1.2.3/tcp/1", "is not a multiaddr"),
        ("gateway_addresses", "/ip4/127.0.0.1/tcp/7070", "must end in /p2p/<peer id>"),
    ],
)
def test_malformed_addresses_are_refused_at_load(key: str, value: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("worker", None, overrides={key: [value]}, environ={})
    (problem,) = info.value.problems
    assert problem.startswith(f"<defaults>: {key}[0]: {value!r} {why}")


def test_a_malformed_listen_flag_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gateway", "--listen", "/ip4/127.0.0.1/tcp/x"]) == 2
    err = capsys.readouterr().err
    assert "listen_addresses[0]: '/ip4/127.0.0.1/tcp/x' is not a multiaddr" in err
    assert "Traceback" not in err
    assert "internal error" not in err


def test_a_key_others_can_read_is_refused_unless_allowed(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tls = pki.node("w", "worker")
    keys = pki.config_keys(tls)
    config = write_toml(tmp_path / "w.toml", keys)
    assert main(["worker", "--config", str(config), "--validate"]) == 0  # issued 0600
    capsys.readouterr()
    tls.key.chmod(0o644)
    assert main(["worker", "--config", str(config), "--validate"]) == 2
    err = capsys.readouterr().err
    assert f"key_pem: {tls.key} is accessible by group or others (mode 0644)" in err
    assert "allow_insecure_key_permissions" in err
    allowed = write_toml(tmp_path / "allowed.toml", {**keys, "allow_insecure_key_permissions": True})
    assert main(["worker", "--config", str(allowed), "--validate"]) == 0


def test_a_key_from_another_node_is_refused_naming_both_files(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine, other = pki.node("gw", "gateway"), pki.node("other", "gateway")
    keys = {**pki.config_keys(mine), "key_pem": str(other.key)}
    problems = check_files(load_config("gateway", write_toml(tmp_path / "g.toml", keys), environ={}), "g")
    assert problems == [
        f"g: key_pem {other.key} does not belong to cert_pem {mine.cert}: the certificate is for peer "
        f"{peer_of(mine.key)}, the key is peer {peer_of(other.key)}; "
        "configure the key that was issued with this certificate"
    ]
    assert main(["gateway", "--config", str(tmp_path / "g.toml"), "--validate"]) == 2
    assert "does not belong to cert_pem" in capsys.readouterr().err


def peer_of(key: Path) -> str:
    return peer_id_of(load_private_key(key).public_key())
