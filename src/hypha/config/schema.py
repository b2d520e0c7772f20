"""One frozen dataclass per role section, each field documented.

Owns the shape, defaults and per-field checks of node configuration (ranges, and addresses
that must parse as multiaddrs; that numbers are finite is the loader's check). Keys follow the
original Hypha's names where they exist. Every field carries a ``doc`` in its metadata:
``hypha init`` writes it as a comment and ``--validate`` names the key in its messages.
Loading (TOML, environment, CLI layering) is ``config/load.py``'s job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import multiaddr

ExecutorRuntime = Literal["process", "aggregate"]
OfferStrategy = Literal["whole", "flexible"]


def doc(text: str, default: Any = None, **kwargs: Any) -> Any:
    """A dataclass field with a docstring in its metadata."""
    if "default_factory" in kwargs:
        return field(metadata={"doc": text}, **kwargs)
    return field(default=default, metadata={"doc": text})


_IP_PROTOCOLS = frozenset({"ip4", "ip6"})


def check_addresses(key: str, values: list[str], *, listen: bool = False, peer: bool = False) -> None:
    """Refuse a value of ``key`` that is not a multiaddr (or not one a node can use).

    Args:
        key: The config key, named in the message.
        values: Its multiaddrs.
        listen: Each must name an IP address and a TCP port (what the host listens on).
        peer: Each must end in ``/p2p/<peer id>`` (whom to dial).

    Raises:
        ValueError: naming the key, the index and the bad value.
    """
    for i, text in enumerate(values):
        try:
            names = {p.name for p in multiaddr.Multiaddr(text).protocols()}
        except (ValueError, multiaddr.exceptions.Error) as exc:
            raise ValueError(f"{key}[{i}]: {text!r} is not a multiaddr: {exc}") from None
        if not names:
            raise ValueError(f"{key}[{i}]: {text!r} is not a multiaddr")
        if listen and not (names & _IP_PROTOCOLS and "tcp" in names):
            raise ValueError(
                f"{key}[{i}]: {text!r} must name an IP address and a TCP port, e.g. /ip4/0.0.0.0/tcp/7070"
            )
        if peer and "p2p" not in names:
            raise ValueError(f"{key}[{i}]: {text!r} must end in /p2p/<peer id>")


def _check_non_negative(section: object, keys: tuple[str, ...]) -> None:
    for key in keys:
        if not getattr(section, key) >= 0:  # NaN too, for sections built in Python
            raise ValueError(f"{key}: must not be negative, got {getattr(section, key)}")


@dataclass(frozen=True)
class NetworkSection:
    """Keys every node has: identity, trust, addresses."""

    cert_pem: Path = doc("PEM certificate of this node, signed by the network CA.", Path("node-cert.pem"))
    key_pem: Path = doc(
        "PEM PKCS#8 Ed25519 private key of this node (its libp2p identity).", Path("node-key.pem")
    )
    trust_pem: Path = doc("PEM bundle of CA certificates this node trusts.", Path("node-trust.pem"))
    crls_pem: Path | None = doc("PEM certificate revocation lists; re-read when the file changes.", None)
    listen_addresses: list[str] = doc(
        "Multiaddrs to listen on; port 0 picks a free port. Empty: do not listen (behind NAT).",
        default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"],
    )
    external_addresses: list[str] = doc(
        "Multiaddrs other peers should use to reach this node, announced in addition to the listen addresses.",
        default_factory=list,
    )
    exclude_cidr: list[str] = doc(
        "CIDR ranges whose addresses are never dialed when learned from other peers (e.g. private ranges).",
        default_factory=list,
    )
    rpc_timeout_seconds: float = doc("Deadline of one request/response exchange.", 10.0)
    allow_insecure_key_permissions: bool = doc(
        "Start even though group or others may read key_pem (anyone who can read it can be this node).",
        False,
    )

    def __post_init__(self) -> None:
        if not self.rpc_timeout_seconds > 0:
            raise ValueError("rpc_timeout_seconds: must be positive")
        check_addresses("listen_addresses", self.listen_addresses, listen=True)
        check_addresses("external_addresses", self.external_addresses)


@dataclass(frozen=True)
class ClientNetworkSection(NetworkSection):
    """Network keys of nodes that join through gateways."""

    gateway_addresses: list[str] = doc(
        "Multiaddrs (with /p2p/<peer id>) of gateways to dial; at least one must answer.",
        default_factory=list,
    )
    relay_circuit: bool = doc(
        "Reserve a relay slot on the gateways so peers can reach this node when it cannot be dialed.",
        True,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_addresses("gateway_addresses", self.gateway_addresses, peer=True)


@dataclass(frozen=True)
class GatewayConfig(NetworkSection):
    """``hypha gateway``: bootstrap, DHT anchor, circuit relay."""

    relay_max_reservations: int = doc("Relay reservations this gateway grants at once.", 128)
    relay_max_circuits: int = doc("Relayed connections per reserved peer.", 16)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.listen_addresses:
            raise ValueError("listen_addresses: a gateway must listen on at least one address")
        _check_non_negative(self, ("relay_max_reservations", "relay_max_circuits"))


@dataclass(frozen=True)
class ResourcesSection:
    """What this worker offers."""

    gpu: float = doc("GPU memory in GB.", 0.0)
    cpu: float = doc("CPU cores.", 1.0)
    memory: float = doc("Memory in GB.", 4.0)
    storage: float = doc("Disk in GB.", 10.0)

    def __post_init__(self) -> None:
        _check_non_negative(self, ("gpu", "cpu", "memory", "storage"))


@dataclass(frozen=True)
class OfferSection:
    """Pricing of this worker's offers."""

    price: float = doc("Asking price (per lease) used by the 'whole' strategy.", 1.0)
    floor: float = doc("Lowest bid this worker answers.", 0.5)
    strategy: OfferStrategy = doc(
        "'whole': offer all free resources at max(price, bid); 'flexible': exactly what was asked, at the bid.",
        "whole",
    )

    def __post_init__(self) -> None:
        _check_non_negative(self, ("price", "floor"))


@dataclass(frozen=True)
class ExecutorSection:
    """One executor this worker can run."""

    executor_class: Literal["train", "aggregate"] = doc("'train' or 'aggregate' (TOML key: class).", "train")
    name: str = doc("Executor name that schedulers ask for.", "diloco")
    runtime: ExecutorRuntime = doc("'process' (a child process) or 'aggregate' (in the worker).", "process")
    cmd: str = doc("Program to run for 'process' executors.", "")
    args: list[str] = doc(
        "Arguments; {SOCKET_PATH}, {WORK_DIR} and {JOB_JSON} are replaced.", default_factory=list
    )

    def __post_init__(self) -> None:
        if self.runtime == "process" and not self.cmd:
            raise ValueError("cmd: a 'process' executor needs a command")


@dataclass(frozen=True)
class WorkerConfig(ClientNetworkSection):
    """``hypha worker``: offers resources, holds leases, runs executors."""

    work_dir: Path = doc(
        "Directory under which each task gets its own work directory.", Path("/tmp/hypha-work")
    )
    resources: ResourcesSection = doc("Resources offered.", default_factory=ResourcesSection)
    offer: OfferSection = doc("Pricing.", default_factory=OfferSection)
    executors: list[ExecutorSection] = doc("Executors this worker runs.", default_factory=list)
    offer_window_seconds: float = doc("How long a reservation behind an offer is held.", 5.0)
    batch_window_seconds: float = doc("How long advertisements are collected before offering.", 0.05)
    kill_grace_seconds: float = doc("Seconds between SIGTERM and SIGKILL when stopping an executor.", 5.0)
    cache_slices: int = doc("Dataset slices kept in the worker's cache (least recently used evicted).", 64)
    prefetch_depth: int = doc("Slices fetched ahead of the executor's requests.", 2)
    spare_bytes: int = doc(
        "Bytes of used files (evicted slices, applied updates) kept for transfers to overwrite: "
        "faster than writing new files. 0 turns it off.",
        1 << 30,
    )
    throttle: float = doc(
        "Test knob: train N times slower than this machine can (emulates a slow worker).", 1.0
    )
    uri_allow: list[str] = doc(
        "URI prefixes executors may fetch by reference (e.g. 'file:///data/'); empty: none.",
        default_factory=list,
    )
    run_as: str | None = doc(
        "User (name or numeric uid) that executor processes run as, with that user's group "
        "and no others; each task's work dir and bridge socket are handed to it. Needs a "
        "worker running as root. Unset: executors run as the worker's own user.",
        None,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("offer_window_seconds", "batch_window_seconds", "kill_grace_seconds"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}: must be positive")
        if self.cache_slices < 1 or self.prefetch_depth < 0:
            raise ValueError("cache_slices/prefetch_depth: cache_slices >= 1, prefetch_depth >= 0")
        if self.spare_bytes < 0:
            raise ValueError("spare_bytes: must not be negative")
        if self.throttle < 1.0:
            raise ValueError(f"throttle: must be at least 1 (1 is full speed), got {self.throttle}")


@dataclass(frozen=True)
class SchedulerConfig(ClientNetworkSection):
    """``hypha scheduler``: runs one job."""

    lease_seconds: float = doc("Lifetime of a lease; renewed at 75%.", 30.0)
    offer_deadline_seconds: float = doc("How long offers are collected for one advertisement.", 1.0)
    state_dir: Path | None = doc(
        "Directory of the scheduler's persisted job state (SQLite), for --resume; unset: not kept.", None
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lease_seconds <= 0 or self.offer_deadline_seconds <= 0:
            raise ValueError("lease_seconds/offer_deadline_seconds: must be positive")


@dataclass(frozen=True)
class DataConfig(ClientNetworkSection):
    """``hypha data``: announces datasets and serves their slices."""

    dataset_path: list[Path] = doc(
        "Prepared dataset directories (each with a manifest.json) to serve.", default_factory=list
    )
    announce_interval_seconds: float = doc("How often dataset records are re-announced.", 60.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.announce_interval_seconds <= 0:
            raise ValueError("announce_interval_seconds: must be positive")


ROLE_CONFIGS: dict[str, type[NetworkSection]] = {
    "gateway": GatewayConfig,
    "worker": WorkerConfig,
    "scheduler": SchedulerConfig,
    "data": DataConfig,
}
