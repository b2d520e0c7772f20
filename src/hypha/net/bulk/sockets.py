"""Socket helpers of the direct channel, and the bridge from trio to blocking ones.

Owns reading whole frames off a synchronous TLS socket, the TLS handshake and the first
frame on a non-blocking one on the event loop (``handshake``, ``receive_frame``: a peer
that never speaks then holds no worker thread), the peer's verified credentials from its
certificate, running a blocking loop in a worker thread that a cancellation can interrupt
(``in_thread``), and picking the host to listen on and to advertise. It decides nothing
about the exchange: what is sent and when belongs to ``direct.py``.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Final, TypeVar

import trio
from cryptography import x509

from hypha.errors import AdmissionError, ProtocolError, TransferError
from hypha.net.bulk.exchange import FRAME_LIMIT_BYTES
from hypha.pki.verify import CertificateVerifier, PeerCredentials
from hypha.protocol import codec
from hypha.protocol import messages as m

T = TypeVar("T")

MAX_IO_ROUNDS: Final = 4096
"""Socket waits one ``handshake`` or ``receive_frame`` may take (a peer dribbling its bytes
one at a time runs out of them long before it can send a whole frame that way)."""


def fill(sock: ssl.SSLSocket, view: memoryview) -> None:
    """Receive exactly ``len(view)`` bytes into ``view``.

    Raises:
        TransferError: the connection closed first.
    """
    got = 0
    while got < len(view):
        num = sock.recv_into(view[got:])
        if not num:
            raise TransferError(f"connection closed {len(view) - got} bytes short")
        got += num


def read_frame_blocking(sock: ssl.SSLSocket) -> m.Msg:
    """Read and decode one frame; a malformed one raises ``hypha.errors.ProtocolError``."""
    header = memoryview(bytearray(codec.HEADER.size))
    try:
        fill(sock, header)
        body = memoryview(bytearray(codec.parse_header(bytes(header), FRAME_LIMIT_BYTES)))
        fill(sock, body)
        return codec.decode_body(bytes(body))
    except codec.ProtocolError as exc:
        raise ProtocolError(str(exc)) from exc


async def handshake(tls: ssl.SSLSocket) -> None:
    """Run the TLS handshake of the non-blocking ``tls`` on the event loop.

    Bounded by the caller's deadline (and ``MAX_IO_ROUNDS``); no thread waits for the peer.

    Raises:
        OSError: the handshake failed (``ssl.SSLError`` for a refused certificate).
        ProtocolError: the peer used up ``MAX_IO_ROUNDS``.
    """
    for _ in range(MAX_IO_ROUNDS):
        try:
            tls.do_handshake()
            return
        except ssl.SSLWantReadError:
            await trio.lowlevel.wait_readable(tls)
        except ssl.SSLWantWriteError:
            await trio.lowlevel.wait_writable(tls)
    raise ProtocolError(f"TLS handshake not done after {MAX_IO_ROUNDS} socket waits")


async def receive_frame(tls: ssl.SSLSocket, limit: int = FRAME_LIMIT_BYTES) -> m.Msg:
    """Read and decode one frame of at most ``limit`` bytes off the non-blocking ``tls``.

    Bounded by the caller's deadline (and ``MAX_IO_ROUNDS``), on the event loop.

    Raises:
        ProtocolError: a malformed or oversized frame, or ``MAX_IO_ROUNDS`` used up.
        TransferError: the connection closed first.
        OSError: the connection broke.
    """
    header = await _receive(tls, codec.HEADER.size)
    try:
        length = codec.parse_header(header, limit)
    except codec.ProtocolError as exc:
        raise ProtocolError(str(exc)) from exc
    body = await _receive(tls, length)
    try:
        return codec.decode_body(body)
    except codec.ProtocolError as exc:
        raise ProtocolError(str(exc)) from exc


async def _receive(tls: ssl.SSLSocket, size: int) -> bytes:
    """Exactly ``size`` bytes off the non-blocking ``tls``, in at most ``MAX_IO_ROUNDS`` reads."""
    view = memoryview(bytearray(size))
    got = 0
    for _ in range(MAX_IO_ROUNDS):
        if got == size:
            break
        try:
            num = tls.recv_into(view[got:])
        except ssl.SSLWantReadError:
            await trio.lowlevel.wait_readable(tls)
            continue
        except ssl.SSLWantWriteError:
            await trio.lowlevel.wait_writable(tls)
            continue
        if not num:
            raise TransferError(f"connection closed {size - got} bytes short")
        got += num
    if got < size:
        raise ProtocolError(f"no whole frame after {MAX_IO_ROUNDS} socket reads")
    return bytes(view)


def peer_credentials(tls: ssl.SSLSocket, verifier: CertificateVerifier) -> PeerCredentials:
    """The verified identity behind the peer's certificate (OpenSSL checked the chain already).

    Raises:
        AdmissionError: no certificate, or one ``verifier`` refuses.
    """
    der = tls.getpeercert(binary_form=True)
    if not der:
        raise AdmissionError("the peer presented no certificate")
    creds, _ = verifier.verify(x509.load_der_x509_certificate(der))
    return creds


async def in_thread(fn: Callable[[], T], sock: socket.socket, limiter: trio.CapacityLimiter) -> T:
    """Run a blocking loop on ``sock`` in a worker thread taken from ``limiter``.

    Cancellation: shuts ``sock`` down so that the thread returns promptly, waits for it,
    then raises ``Cancelled``; no thread outlives the call.
    """
    finished = False

    async def abort_on_cancel() -> None:
        try:
            await trio.sleep_forever()
        finally:
            if not finished:
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)

    results: list[T] = []
    errors: list[BaseException] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(abort_on_cancel)
        try:
            results.append(await trio.to_thread.run_sync(fn, limiter=limiter))
        except BaseException as exc:  # re-raised below, outside the nursery's group
            errors.append(exc)
        finally:
            finished = True
            nursery.cancel_scope.cancel()
    if errors:
        raise errors[0]
    return results[0]


def listen_host(addresses: list[str]) -> str | None:
    """The host of the first ``/ip4`` or ``/ip6`` TCP multiaddr, if any."""
    for address in addresses:
        parts = address.split("/")
        if len(parts) >= 5 and parts[1] in ("ip4", "ip6") and parts[3] == "tcp":
            return parts[2]
    return None


def advertised_host(host: str, external_addresses: list[str]) -> str | None:
    """The host others should dial: the bound one, or for a wildcard the first external one."""
    if host not in ("0.0.0.0", "::"):
        return host
    external = listen_host(external_addresses)
    return external if external not in (None, "0.0.0.0", "::") else None


def peername(sock: socket.socket) -> tuple[str, str]:
    """The connected peer's host (the handshake gate's key) and ``host:port`` for logs."""
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "unknown", "unknown address"
    return str(host), f"{host}:{port}"
