"""The direct channel: the bulk exchange over mutual TLS 1.3 on a plain TCP socket, both ends.

Owns the sender's listener and its per-connection exchange, and the receiver's side:
connect, handshake, check that the listener is the expected peer, receive into a ``Sink``.
The CA and CRL are checked by OpenSSL both ways, then the peer ID by
``CertificateVerifier``. On the listener, the TLS handshake and the first frame (the
token) run on the event loop on a non-blocking socket, within a handshake deadline and
behind ``gate.py``'s caps, so that sockets that never speak, certificate or not, hold no
worker thread; only the peer ID check (which may re-read the CRL file) takes one, once the
handshake is done. Byte loops run on synchronous ``ssl`` sockets in worker threads, which
release the GIL while encrypting, hashing and writing. It neither judges requests
(``offers.py``) nor retries or falls back to a stream (``pull.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl

import trio

from hypha.errors import AdmissionError, HyphaError, TransferError
from hypha.net.bulk.exchange import CHANGED, CHUNK_BYTES, expect_go, pull_request
from hypha.net.bulk.gate import HandshakeGate
from hypha.net.bulk.offers import Offers, Pending
from hypha.net.bulk.sockets import (
    fill,
    handshake,
    in_thread,
    peer_credentials,
    peername,
    read_frame_blocking,
    receive_frame,
)
from hypha.net.sink import HashingWriter, Sink
from hypha.pki.verify import CertificateVerifier, PeerCredentials, TlsFiles, bulk_ssl_context
from hypha.protocol import codec
from hypha.protocol import messages as m

logger = logging.getLogger(__name__)


class DirectUnavailableError(TransferError):
    """The direct channel could not be opened or authenticated; the stream may still work."""


class DirectChannel:
    """Both ends of the direct TLS channel of one node.

    Args:
        files: the node's certificate, key, trust bundle and CRLs.
        verifier: the node's verifier, for the peer ID behind a certificate.
        offers: the sender's registry that judges incoming requests.
        limiter: worker threads for the byte loops.
        idle_timeout_seconds: longest silence on a connection before it counts as failed.
        gate: the caps on the listener's connections still handshaking.
        handshake_timeout_seconds: how long an accepted connection has for its TLS handshake
            and its first frame, in all.

    Raises:
        ValueError: ``handshake_timeout_seconds`` is not positive.
    """

    def __init__(
        self,
        files: TlsFiles,
        verifier: CertificateVerifier,
        offers: Offers,
        limiter: trio.CapacityLimiter,
        idle_timeout_seconds: float,
        *,
        gate: HandshakeGate,
        handshake_timeout_seconds: float,
    ) -> None:
        if not handshake_timeout_seconds > 0:
            raise ValueError("handshake_timeout_seconds must be positive")
        self._server_ctx = bulk_ssl_context(files, server_side=True)
        self._client_ctx = bulk_ssl_context(files, server_side=False)
        self._verifier = verifier
        self._offers = offers
        self._limiter = limiter
        self._idle = idle_timeout_seconds
        self._gate = gate
        self._handshake_seconds = handshake_timeout_seconds
        self._address: str | None = None

    @property
    def address(self) -> str | None:
        """``host:port`` others dial while ``serve`` runs with an advertisable host, else None."""
        return self._address

    # --- sender -----------------------------------------------------------------------

    async def serve(
        self,
        host: str,
        public: str | None,
        *,
        task_status: trio.TaskStatus[str | None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host``, port 0, and serve every connection until cancelled.

        Args:
            host: the address to bind.
            public: the host to advertise, or None when no one can dial this one.

        Reports the advertised ``host:port`` (or None) through ``task_status.started``.

        Cancellation: closes the listener and aborts the transfers it serves.
        """
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with trio.socket.socket(family, socket.SOCK_STREAM) as listener:
            await listener.bind((host, 0))
            listener.listen(64)
            port = listener.getsockname()[1]
            if public is not None:
                self._address = f"[{public}]:{port}" if ":" in public else f"{public}:{port}"
            logger.info("bulk listener on %s port %d, advertised as %s", host, port, self._address)
            try:
                async with trio.open_nursery() as nursery:
                    task_status.started(self._address)
                    while True:
                        conn, _ = await listener.accept()
                        nursery.start_soon(self._serve_connection, conn)
            finally:
                self._address = None

    async def _serve_connection(self, conn: trio.socket.SocketType) -> None:
        """One direct connection: handshake, check the request, send, await confirmation.

        The per-connection error boundary of the listener.
        """
        sock = socket.socket(fileno=conn.detach())
        sock.setblocking(False)
        host, remote = peername(sock)
        try:
            with (
                sock,
                self._server_ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False) as tls,
            ):
                if not self._gate.enter(host):
                    return  # closed at once: too many connections still handshaking
                try:
                    accepted = await self._accept(tls, remote)
                finally:
                    self._gate.leave(host)
                if accepted is not None:
                    tls.settimeout(self._idle)  # blocking from here on, for the worker threads
                    await self._answer(tls, *accepted)
        except Exception:
            logger.exception("direct bulk connection from %s failed", remote)

    async def _accept(self, tls: ssl.SSLSocket, remote: str) -> tuple[m.Msg, PeerCredentials] | None:
        """Handshake, authenticate and read the request within the deadline; None if refused.

        On the event loop, on the non-blocking socket: waiting for the peer takes no thread
        (checking its certificate, after the handshake, takes one briefly).
        """
        try:
            with trio.fail_after(self._handshake_seconds):
                await handshake(tls)
                creds = await trio.to_thread.run_sync(
                    peer_credentials, tls, self._verifier, limiter=self._limiter
                )
                return await receive_frame(tls), creds
        except trio.TooSlowError:
            self._gate.timed_out(remote, self._handshake_seconds)
        except (OSError, HyphaError) as exc:
            self._offers.refused(remote, exc)
        return None

    async def _answer(self, tls: ssl.SSLSocket, request: m.Msg, creds: PeerCredentials) -> None:
        """Judge the request; send the file (or the refusal) and take the receiver's verdict."""
        decision = self._offers.check(request, creds.peer_id)
        if isinstance(decision, m.ErrorResponse):
            frame = codec.encode_frame(decision)
            with contextlib.suppress(OSError):
                await in_thread(lambda: tls.sendall(frame), tls, self._limiter)
            return
        pending = decision
        try:
            ack = await in_thread(lambda: self._send_blocking(tls, pending), tls, self._limiter)
        except (OSError, HyphaError) as exc:
            logger.warning("direct send of %s failed: %s", pending.offer.transfer_id, exc)
            return
        self._offers.confirmed(pending, ack, creds.peer_id, "direct")

    def _send_blocking(self, tls: ssl.SSLSocket, pending: Pending) -> m.Msg:
        """Send ``TransferDone`` and the file (or ``CHANGED``); return the receiver's answer."""
        size = pending.offer.size
        with open(pending.path, "rb", buffering=0) as f:
            if os.fstat(f.fileno()).st_size != size:
                tls.sendall(codec.encode_frame(CHANGED))
                return CHANGED
            tls.sendall(codec.encode_frame(m.TransferDone(transfer_id=pending.offer.transfer_id, ok=True)))
            view = memoryview(bytearray(min(CHUNK_BYTES, max(size, 1))))
            remaining = size
            while remaining > 0:
                num = f.readinto(view[: min(len(view), remaining)])
                if not num:
                    raise TransferError(f"{pending.path} shrank during the transfer")
                tls.sendall(view[:num])
                remaining -= num
        return read_frame_blocking(tls)

    # --- receiver ---------------------------------------------------------------------

    async def pull(self, offer: m.TensorOffer, sender: str, sink: Sink) -> None:
        """Receive ``offer`` from the listener at ``offer.address`` into ``sink``.

        Raises:
            DirectUnavailableError: the listener cannot be reached, or is not ``sender``.
            TransferError: the transfer broke or its sha256 did not match.

        Cancellation: shuts the socket down and waits for the thread (see ``in_thread``).
        """
        host, _, port = (offer.address or "").rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        raw = socket.socket(family, socket.SOCK_STREAM)
        with raw, self._client_ctx.wrap_socket(raw, do_handshake_on_connect=False) as tls:

            def connect() -> None:
                tls.settimeout(self._idle)
                tls.connect((host, int(port)))
                tls.do_handshake()
                peer = peer_credentials(tls, self._verifier).peer_id
                if peer != sender:
                    raise AdmissionError(f"the listener at {offer.address} is {peer}, not {sender}")

            try:
                await in_thread(connect, tls, self._limiter)
            except (OSError, ValueError, HyphaError) as exc:
                raise DirectUnavailableError(f"{offer.address}: {exc}") from exc
            try:
                await in_thread(lambda: _receive_blocking(tls, offer, sink), tls, self._limiter)
            except OSError as exc:
                raise TransferError(f"direct transfer from {offer.address} broke: {exc}") from exc


def _receive_blocking(tls: ssl.SSLSocket, offer: m.TensorOffer, sink: Sink) -> None:
    """Request, receive and confirm one transfer on a connected, verified TLS socket.

    This thread decrypts into one buffer while a ``HashingWriter`` thread hashes and writes
    the previous ones, so the two run on two cores.
    """
    tls.sendall(codec.encode_frame(pull_request(offer)))
    expect_go(read_frame_blocking(tls), offer)
    with HashingWriter(sink, min(CHUNK_BYTES, max(offer.size, 1))) as writer:
        remaining = offer.size
        while remaining > 0:
            buffer = writer.buffer()
            length = min(len(buffer), remaining)
            fill(tls, buffer[:length])
            writer.submit(buffer, length)
            remaining -= length
    tls.sendall(codec.encode_frame(sink.verdict(offer)))
    sink.check(offer.sha256)
