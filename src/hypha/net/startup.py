"""Checks a node runs before its host starts: its own key, and that its ports are free.

Owns refusing two set-ups that would otherwise start and fail later, or never: a private
key that is not the certificate's (every handshake would fail), and a fixed TCP listen port
that another process already holds. py-libp2p opens its TCP listeners with SO_REUSEPORT
(``libp2p/transport/tcp/tcp.py``, ``_set_reuse_flags``, for hole punching), so a second node
on a taken port binds without complaint and the kernel splits new connections between the
two. Each fixed port is therefore probe-bound here first, without SO_REUSEPORT. It is a
start-up check, not a lock: two nodes started at the same instant can both pass it.
"""

from __future__ import annotations

import errno
import socket

import multiaddr

from hypha.errors import ConfigError
from hypha.pki.identity import check_key_matches_certificate
from hypha.pki.verify import TlsFiles


def check_node_start(tls: TlsFiles, listen_addresses: list[str]) -> None:
    """Refuse to start a node whose key is not its certificate's or whose port is taken.

    Blocking (file reads and local binds only), so it runs before the host exists.

    Raises:
        ConfigError: naming the files, or the listen address and its port.
    """
    check_key_matches_certificate(tls.cert, tls.key)
    for text in listen_addresses:
        check_port_free(text)


def check_port_free(text: str) -> None:
    """Refuse a listen multiaddr whose fixed TCP port another socket is bound to.

    Port 0 (any free port) and addresses without an IP and a TCP port are not probed.

    Raises:
        ConfigError: The port is in use, or the address cannot be bound on this machine.
    """
    try:
        addr = multiaddr.Multiaddr(text)
        port = int(addr.value_for_protocol("tcp") or 0)
        names = {p.name for p in addr.protocols()}
    except (ValueError, multiaddr.exceptions.Error) as exc:
        raise ConfigError(f"listen_addresses: {text!r} is not a multiaddr: {exc}") from None
    family = socket.AF_INET6 if "ip6" in names else socket.AF_INET
    if port == 0 or not names & {"ip4", "ip6"}:
        return
    host = addr.value_for_protocol("ip6" if family == socket.AF_INET6 else "ip4")
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR: sockets of an earlier run in TIME_WAIT do not hold the port; a
        # listening socket still does (Linux refuses the bind whatever flags it carries).
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"listen_addresses: {text}: TCP port {port} is already in use "
                    "(another node or program listens there); pick another port or stop it"
                ) from exc
            raise ConfigError(f"listen_addresses: cannot listen on {text}: {exc.strerror}") from exc
