"""Load a role's configuration: defaults, then TOML, then ``HYPHA_<KEY>``, then CLI flags.

Owns type checking of raw values against the dataclasses in ``schema.py``, collecting every
problem with its key and file instead of stopping at the first (numbers must be finite),
resolving relative paths against the config file's directory, checking the files a config
names (``check_files``), and writing commented default files for ``hypha init``.
It is the only module that reads ``os.environ`` for configuration.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from hypha.config.schema import ROLE_CONFIGS, NetworkSection
from hypha.config.toml import format_value
from hypha.errors import ConfigError
from hypha.pki.identity import check_key_matches_certificate, key_permission_problem

T = TypeVar("T")
ENV_PREFIX = "HYPHA_"
_TOML_RENAMES = {"executor_class": "class"}


def toml_key(name: str) -> str:
    """The TOML key of a config dataclass field (most are the field name itself)."""
    return _TOML_RENAMES.get(name, name)


_toml_key = toml_key


def _convert(value: Any, tp: Any, key: str, problems: list[str], base: Path | None) -> Any:
    """Check ``value`` against type ``tp``; append a problem and return None when it fails."""
    origin = get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key, problems, base)
    if origin is Literal:
        if value not in get_args(tp):
            allowed = ", ".join(repr(a) for a in get_args(tp))
            problems.append(f"{key}: {value!r} is not one of {allowed}")
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list, got {type(value).__name__}")
            return None
        return [_convert(v, item_tp, f"{key}[{i}]", problems, base) for i, v in enumerate(value)]
    if origin is dict:
        _, value_tp = get_args(tp)
        if not isinstance(value, Mapping):
            problems.append(f"{key}: expected a table, got {type(value).__name__}")
            return None
        return {str(k): _convert(v, value_tp, f"{key}.{k}", problems, base) for k, v in value.items()}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            problems.append(f"{key}: expected a table, got {type(value).__name__}")
            return None
        return _build(tp, value, key + ".", problems, base)
    if tp is Path:
        if not isinstance(value, str | Path):
            problems.append(f"{key}: expected a path string, got {type(value).__name__}")
            return None
        path = Path(value).expanduser()
        return base / path if base is not None and not path.is_absolute() else path
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{key}: expected a number, got {value!r}")
            return None
        if not math.isfinite(value):
            # TOML has nan and inf; no duration, rate or price of ours means either.
            problems.append(f"{key}: expected a finite number, got {value!r}")
            return None
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _build(cls: type[T], raw: Mapping[str, Any], prefix: str, problems: list[str], base: Path | None) -> T:
    hints = typing.get_type_hints(cls)
    fields = {_toml_key(f.name): f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in raw:
        if key not in fields:
            problems.append(f"{prefix}{key}: unknown key")
    kwargs: dict[str, Any] = {}
    before = len(problems)
    for toml_key, f in fields.items():
        if toml_key in raw:
            kwargs[f.name] = _convert(raw[toml_key], hints[f.name], prefix + toml_key, problems, base)
    if len(problems) > before:
        return None  # type: ignore[return-value]
    try:
        return cls(**kwargs)
    except ValueError as exc:
        problems.append(f"{prefix}{exc}")
        return None  # type: ignore[return-value]


def build_section(cls: type[T], raw: Mapping[str, Any], *, where: str, base: Path | None = None) -> T:
    """Check ``raw`` (TOML-shaped values) against the config dataclass ``cls`` and build it.

    Args:
        cls: A section type from ``schema.py`` (or any config dataclass).
        raw: Values by TOML key, nested sections as mappings.
        where: Where the values came from (a file name), put in front of each problem.
        base: Directory that relative paths are resolved against (None: left relative).

    Raises:
        ConfigError: with every problem found, each naming its key.
    """
    problems: list[str] = []
    config = _build(cls, raw, "", problems, base)
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) in {where}", [f"{where}: {p}" for p in problems])
    return config


def _parse_env(value: str, tp: Any) -> Any:
    """Environment values are strings; lists are comma separated."""
    origin = get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        tp = next(a for a in get_args(tp) if a is not type(None))
        origin = get_origin(tp)
    if origin is list:
        return [v.strip() for v in value.split(",") if v.strip()]
    if tp is bool:
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        return value
    if tp is float or tp is int:
        try:
            return tp(value)
        except ValueError:
            return value
    return value


def load_config(
    role: str,
    path: Path | None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> NetworkSection:
    """Load and check the configuration of ``role``.

    Args:
        role: gateway, scheduler, worker or data.
        path: TOML file, or None for defaults only.
        overrides: values from CLI flags (highest priority); None values are ignored.
        environ: environment to read ``HYPHA_<KEY>`` from (default ``os.environ``).

    Raises:
        ConfigError: with every problem found, each naming its key and the file.
    """
    cls = ROLE_CONFIGS.get(role)
    if cls is None:
        raise ConfigError(f"unknown role {role!r}")
    raw: dict[str, Any] = {}
    base: Path | None = None
    where = str(path) if path is not None else "<defaults>"
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        base = path.resolve().parent
    env = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = env.get(ENV_PREFIX + f.name.upper())
        if value is not None and not dataclasses.is_dataclass(hints[f.name]):
            raw[_toml_key(f.name)] = _parse_env(value, hints[f.name])
    for key, value in (overrides or {}).items():
        if value is not None:
            raw[key] = value
    return build_section(cls, raw, where=where, base=base)


def check_files(config: NetworkSection, where: str) -> list[str]:
    """Problems with files the config names.

    A missing certificate, key, trust bundle or CRL; a key that group or others may read
    (unless ``allow_insecure_key_permissions``); a key that is not the certificate's.
    """
    problems = []
    for key in ("cert_pem", "key_pem", "trust_pem", "crls_pem"):
        value = getattr(config, key)
        if value is not None and not Path(value).is_file():
            problems.append(f"{where}: {key}: file {value} does not exist")
    if config.key_pem.is_file():
        insecure = key_permission_problem(config.key_pem)
        if insecure is not None and not config.allow_insecure_key_permissions:
            problems.append(f"{where}: {insecure}")
        if config.cert_pem.is_file():
            try:
                check_key_matches_certificate(config.cert_pem, config.key_pem)
            except ConfigError as exc:
                problems.append(f"{where}: {exc}")
    for key in ("dataset_path",):
        for p in getattr(config, key, []):
            if not Path(p).is_dir():
                problems.append(f"{where}: {key}: directory {p} does not exist")
    return problems


def render_default(role: str, name: str | None = None) -> str:
    """A commented TOML file with every key of ``role`` at its default."""
    cls = ROLE_CONFIGS[role]
    defaults = cls() if role != "gateway" else cls(listen_addresses=["/ip4/127.0.0.1/tcp/7070"])
    if name:
        defaults = dataclasses.replace(
            defaults,
            cert_pem=Path(f"{name}-cert.pem"),
            key_pem=Path(f"{name}-key.pem"),
            trust_pem=Path(f"{name}-trust.pem"),
        )
    lines = [f"# Hypha {role} configuration. Every key is shown at its default.", ""]
    tables: list[str] = []
    for f in dataclasses.fields(defaults):
        value = getattr(defaults, f.name)
        text = f.metadata.get("doc", "")
        if dataclasses.is_dataclass(value):
            tables.append(f"\n# {text}\n[{f.name}]")
            for sub in dataclasses.fields(value):
                tables.append(f"# {sub.metadata.get('doc', '')}")
                tables.append(f"{_toml_key(sub.name)} = {format_value(getattr(value, sub.name))}")
            continue
        if isinstance(value, list) and value == [] and f.name == "executors":
            tables.append(f"\n# {text} Example:")
            tables.append('# [[executors]]\n# class = "train"\n# name = "diloco"')
            tables.append('# runtime = "process"\n# cmd = "python"')
            tables.append('# args = ["-m", "hypha.training.trainer"]')
            continue
        lines.append(f"# {text}")
        if value is None:
            lines.append(f"# {f.name} = ")
        else:
            lines.append(f"{f.name} = {format_value(value)}")
    return "\n".join(lines + tables) + "\n"


def load_identity(path: Path | None) -> NetworkSection:
    """Load only the identity and trust keys of any role's config (for ``hypha probe``)."""
    if path is None:
        return NetworkSection()
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    keys = ("cert_pem", "key_pem", "trust_pem", "crls_pem", "rpc_timeout_seconds")
    identity = {k: v for k, v in raw.items() if k in keys}
    return build_section(NetworkSection, identity, where=str(path), base=path.resolve().parent)
