"""Bulk transfers: large files offered by a sender and pulled by their receiver.

Owns the sender's offers (size, sha256, one-time token, expiry), the direct channel (a TCP
listener wrapped in mutual TLS 1.3 with the node's certificates: CA and CRL checked by OpenSSL
both ways, then the peer ID by ``CertificateVerifier``), the stream fallback on
``/hypha/tensor/1`` (through a relay when the sender does not listen), and the receiver's pull:
sha256 checked while writing, temp file plus ``os.replace``, retries with exponential backoff.
Byte loops run on synchronous ``ssl`` sockets in worker threads, which release the GIL while
encrypting, hashing and writing. It does not decide what to send or where to store it (roles
do), nor how offers travel (an RPC such as ``TensorPushRequest`` or ``WeightsRequest``).

Both channels speak the same exchange: the receiver sends a ``StreamPullRequest`` frame; the
sender answers ``TransferDone(ok=True)`` and exactly ``size`` raw bytes, or an ``ErrorResponse``;
the receiver confirms with ``TransferDone(ok=<sha256 matched>)``. Only a confirmed transfer
consumes the token, so a failed or corrupted attempt can be retried.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import secrets
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

import trio
from cryptography import x509

from hypha.errors import AdmissionError, HyphaError, ProtocolError, TransferError
from hypha.net.host import Node
from hypha.net.rpc import Stream, read_frame, write_frame
from hypha.net.sink import FinalTransferError, HashingWriter, Sink
from hypha.net.spares import SpareFiles
from hypha.pki.verify import CertificateVerifier, PeerCredentials, bulk_ssl_context
from hypha.protocol import codec, ids
from hypha.protocol import messages as m

logger = logging.getLogger(__name__)
T = TypeVar("T")

CHUNK_BYTES: Final = 4 * 1024 * 1024
"""Unit of file reads, socket writes and disk writes on the direct channel."""
STREAM_CHUNK_BYTES: Final = 1024 * 1024
"""Unit of libp2p stream writes (Yamux is fastest around 1 MiB)."""
CHANGED: Final = m.ErrorResponse(code="changed", detail="the file changed size since the offer")


@dataclass(frozen=True)
class BulkStatistics:
    """Counters of a ``BulkService`` since start; transfers count on both sides."""

    bytes_sent: int
    bytes_received: int
    num_direct: int
    """Transfers completed over the direct TLS channel (sent or received)."""
    num_relayed: int
    """Transfers completed over a libp2p stream, the relay fallback (sent or received)."""
    num_failed: int
    """Pulls that gave up: refused, or every attempt failed."""
    num_retries: int
    num_refused: int
    """Requests this sender refused: TLS handshake, unknown token, wrong peer, changed file."""
    num_reused: int
    """Pulls that overwrote a spare file instead of creating a new one."""
    num_pending: int


@dataclass
class _Counters:
    bytes_sent: int = 0
    bytes_received: int = 0
    num_direct: int = 0
    num_relayed: int = 0
    num_failed: int = 0
    num_retries: int = 0
    num_refused: int = 0
    num_reused: int = 0


@dataclass(frozen=True)
class _Pending:
    offer: m.TensorOffer
    path: Path
    receiver: str
    expires_at: float


class _DirectUnavailableError(TransferError):
    """The direct channel could not be opened or authenticated; the stream may still work."""


class BulkService:
    """Offers files to peers and pulls offered files, over direct TLS or a libp2p stream.

    Args:
        node: the running node whose certificates and streams the service uses.
        backoff_seconds: delay before the first retry of a pull; it doubles per retry.
        idle_timeout_seconds: longest silence on a transfer before it counts as failed.
        max_threads: worker threads for byte loops and file I/O.
        spares: recycled files that pulls overwrite instead of creating new ones (see
            ``spares.py``); ``recycle`` gives files back to it.
    """

    def __init__(
        self,
        node: Node,
        *,
        backoff_seconds: float = 0.1,
        idle_timeout_seconds: float = 30.0,
        max_threads: int = 8,
        spares: SpareFiles | None = None,
    ) -> None:
        self._node = node
        self._spares = spares
        files = node.settings.tls
        self._server_ctx = bulk_ssl_context(files, server_side=True)
        self._client_ctx = bulk_ssl_context(files, server_side=False)
        self._verifier = CertificateVerifier(files.trust, files.crls)
        self._backoff = backoff_seconds
        self._idle = idle_timeout_seconds
        self._limiter = trio.CapacityLimiter(max_threads)
        self._pending: dict[str, _Pending] = {}
        self._address: str | None = None
        self._counts = _Counters()

    @property
    def address(self) -> str | None:
        """``host:port`` of the direct listener, or None when the node does not listen."""
        return self._address

    def recycle(self, path: Path) -> None:
        """Done with ``path`` (a file received earlier): keep it for a later pull, or delete it."""
        if self._spares is None:
            Path(path).unlink(missing_ok=True)
        else:
            self._spares.give(path)

    def statistics(self) -> BulkStatistics:
        return BulkStatistics(**dataclasses.asdict(self._counts), num_pending=len(self._pending))

    async def run(self, *, task_status: trio.TaskStatus[str | None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the stream fallback and, if the node listens, the direct TLS listener.

        The listener binds the host of the node's first IP listen address, on port 0, and
        reports its advertised ``host:port`` (or None) through ``task_status.started``.

        Cancellation: closes the listener and aborts the transfers it serves.
        """
        self._node.set_stream_handler(ids.TENSOR_PROTOCOL, self._serve_stream)
        host = _listen_host(self._node.settings.listen_addresses)
        if host is None:
            task_status.started(None)
            await trio.sleep_forever()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with trio.socket.socket(family, socket.SOCK_STREAM) as listener:
            await listener.bind((host, 0))
            listener.listen(64)
            port = listener.getsockname()[1]
            public = _advertised_host(host, self._node.settings.external_addresses)
            if public is not None:
                self._address = f"[{public}]:{port}" if ":" in public else f"{public}:{port}"
            logger.info("bulk listener on %s port %d, advertised as %s", host, port, self._address)
            try:
                async with trio.open_nursery() as nursery:
                    task_status.started(self._address)
                    while True:
                        conn, _ = await listener.accept()
                        nursery.start_soon(self._serve_direct, conn)
            finally:
                self._address = None

    # --- sender -----------------------------------------------------------------------

    async def offer(
        self,
        path: Path,
        *,
        receiver: str,
        purpose: m.Purpose,
        name: str = "",
        job_id: str = "",
        task_id: str = "",
        round: int = 0,
        samples: int = 0,
        encoding: m.Encoding = "fp32",
        ttl_seconds: float = 120.0,
        sha256: str | None = None,
    ) -> m.TensorOffer:
        """Register ``path`` for one pull by ``receiver`` and describe it.

        Args:
            sha256: the file's digest if already known (saves reading the file).
            ttl_seconds: the offer is forgotten after this long unless pulled.

        Raises:
            TransferError: the file cannot be read.
        """
        path = Path(path)
        try:
            size, digest = await trio.to_thread.run_sync(_describe, path, sha256, limiter=self._limiter)
        except OSError as exc:
            raise TransferError(f"cannot offer {path}: {exc}") from exc
        offer = m.TensorOffer(
            transfer_id=secrets.token_hex(8),
            purpose=purpose,
            size=size,
            sha256=digest,
            token=secrets.token_hex(16),
            address=self._address,
            name=name,
            job_id=job_id,
            task_id=task_id,
            round=round,
            samples=samples,
            encoding=encoding,
        )
        self._purge()
        self._pending[offer.transfer_id] = _Pending(offer, path, receiver, trio.current_time() + ttl_seconds)
        return offer

    def withdraw(self, transfer_id: str) -> bool:
        """Forget an offer; return whether it was still pending."""
        return self._pending.pop(transfer_id, None) is not None

    def _purge(self) -> None:
        now = trio.current_time()
        for transfer_id in [t for t, p in self._pending.items() if p.expires_at < now]:
            del self._pending[transfer_id]

    def _check(self, request: m.Msg, peer: str) -> _Pending | m.ErrorResponse:
        """Match a pull request against the pending offers; refusals are counted and logged."""
        self._purge()
        pending = None
        if isinstance(request, m.StreamPullRequest):
            pending = self._pending.get(request.transfer_id)
            if pending is not None and not secrets.compare_digest(pending.offer.token, request.token):
                pending = None
        if pending is None:
            refusal = m.ErrorResponse(code="unknown", detail="no pending transfer with this id and token")
        elif pending.receiver != peer:
            refusal = m.ErrorResponse(code="forbidden", detail="the offer was made for another peer")
        else:
            return pending
        self._refused(peer, refusal.detail)
        return refusal

    def _confirmed(self, pending: _Pending, ack: m.Msg, peer: str, channel: str) -> None:
        """Consume the token if the receiver confirmed the bytes."""
        if isinstance(ack, m.TransferDone) and ack.ok:
            self._pending.pop(pending.offer.transfer_id, None)
            self._count(pending.offer.size, channel, received=False)
        elif ack is CHANGED:
            self._refused(peer, CHANGED.detail)
        else:
            logger.warning("transfer %s to %s not confirmed: %s", pending.offer.transfer_id, peer, ack)

    def _count(self, size: int, channel: str, *, received: bool) -> None:
        if received:
            self._counts.bytes_received += size
        else:
            self._counts.bytes_sent += size
        if channel == "direct":
            self._counts.num_direct += 1
        else:
            self._counts.num_relayed += 1

    def _refused(self, peer: str, reason: object) -> None:
        self._counts.num_refused += 1
        logger.warning("refused bulk request from %s: %s", peer, reason)

    async def _serve_direct(self, conn: trio.socket.SocketType) -> None:
        """One direct connection: handshake, check the request, send, await confirmation.

        The per-connection error boundary of the listener.
        """
        sock = socket.socket(fileno=conn.detach())
        sock.setblocking(True)
        remote = _peername(sock)
        try:
            with (
                sock,
                self._server_ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False) as tls,
            ):
                tls.settimeout(self._idle)
                try:
                    with trio.fail_after(self._idle):
                        request, creds = await self._in_thread(lambda: self._accept_blocking(tls), tls)
                except (OSError, HyphaError, trio.TooSlowError) as exc:
                    self._refused(remote, exc)
                    return
                decision = self._check(request, creds.peer_id)
                if isinstance(decision, m.ErrorResponse):
                    frame = codec.encode_frame(decision)
                    with contextlib.suppress(OSError):
                        await self._in_thread(lambda: tls.sendall(frame), tls)
                    return
                pending = decision
                try:
                    ack = await self._in_thread(lambda: self._send_blocking(tls, pending), tls)
                except (OSError, HyphaError) as exc:
                    logger.warning("direct send of %s failed: %s", pending.offer.transfer_id, exc)
                    return
                self._confirmed(pending, ack, creds.peer_id, "direct")
        except Exception:
            logger.exception("direct bulk connection from %s failed", remote)

    def _accept_blocking(self, tls: ssl.SSLSocket) -> tuple[m.Msg, PeerCredentials]:
        tls.do_handshake()
        creds = self._peer_credentials(tls)
        return _read_frame_blocking(tls), creds

    def _send_blocking(self, tls: ssl.SSLSocket, pending: _Pending) -> m.Msg:
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
        return _read_frame_blocking(tls)

    async def _serve_stream(self, stream: Stream, peer: str) -> None:
        """The stream fallback: the direct channel's exchange over ``/hypha/tensor/1``."""
        try:
            with trio.fail_after(self._idle):
                decision = self._check(await read_frame(stream), peer)
            if isinstance(decision, m.ErrorResponse):
                with trio.fail_after(self._idle):
                    await write_frame(stream, decision)
                return
            remaining = decision.offer.size
            async with await trio.open_file(decision.path, "rb") as f:
                if await f.seek(0, os.SEEK_END) != remaining:
                    await write_frame(stream, CHANGED)
                    self._confirmed(decision, CHANGED, peer, "stream")
                    return
                await f.seek(0)
                await write_frame(stream, m.TransferDone(transfer_id=decision.offer.transfer_id, ok=True))
                while remaining > 0:
                    data = await f.read(min(STREAM_CHUNK_BYTES, remaining))
                    if not data:
                        raise TransferError(f"{decision.path} shrank during the transfer")
                    with trio.fail_after(self._idle):
                        await stream.write(data)
                    remaining -= len(data)
            with trio.fail_after(self._idle):
                self._confirmed(decision, await read_frame(stream), peer, "stream")
        except (HyphaError, trio.TooSlowError) as exc:
            logger.warning("stream transfer to %s failed: %s", peer, exc or "timeout")
        finally:
            await _close(stream)

    # --- receiver ---------------------------------------------------------------------

    async def pull(self, offer: m.TensorOffer, sender: str, dest: Path, *, attempts: int = 4) -> Path:
        """Fetch an offered file from ``sender`` into ``dest``, checked against its sha256.

        Tries the direct TLS channel when the offer names an address, else (or when it cannot
        be reached or authenticated as ``sender``) a libp2p stream, through a relay if needed.
        Failed or corrupted attempts are retried after ``backoff_seconds``, doubling each time.

        Returns:
            ``dest``, written atomically (a temp file next to it, then ``os.replace``).

        Raises:
            TransferError: the sender refused (unknown token, another receiver, changed file),
                ``dest`` cannot be written, or every attempt failed (the last cause is chained).

        Cancellation: aborts the transfer and removes the temp file; ``dest`` is untouched.
        """
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        dest = Path(dest)
        delay = self._backoff
        last: HyphaError | None = None
        for attempt in range(attempts):
            if attempt:
                self._counts.num_retries += 1
                await trio.sleep(delay)
                delay *= 2
            try:
                channel = await self._pull_once(offer, sender, dest)
            except FinalTransferError:
                self._counts.num_failed += 1
                raise
            except HyphaError as exc:
                last = exc
                logger.warning(
                    "pull %s from %s failed (attempt %d of %d): %s",
                    *(offer.transfer_id, sender, attempt + 1, attempts, exc),
                )
                continue
            self._count(offer.size, channel, received=True)
            return dest
        self._counts.num_failed += 1
        raise TransferError(
            f"transfer {offer.transfer_id} from {sender} failed after {attempts} attempts: {last}"
        ) from last

    async def _pull_once(self, offer: m.TensorOffer, sender: str, dest: Path) -> str:
        """One attempt; return the channel used ("direct" or "stream")."""
        sink = await trio.to_thread.run_sync(
            Sink.create, dest, offer.size, self._spares, limiter=self._limiter
        )
        try:
            channel = "stream"
            if offer.address:
                try:
                    await self._pull_direct(offer, sender, sink)
                    channel = "direct"
                except _DirectUnavailableError as exc:
                    logger.info("direct channel to %s unavailable, using a stream: %s", sender, exc)
            if channel == "stream":
                await self._pull_stream(offer, sender, sink)
            await trio.to_thread.run_sync(sink.commit, limiter=self._limiter)
            self._counts.num_reused += sink.reused
            return channel
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(sink.discard, limiter=self._limiter)

    async def _pull_direct(self, offer: m.TensorOffer, sender: str, sink: Sink) -> None:
        host, _, port = (offer.address or "").rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        raw = socket.socket(family, socket.SOCK_STREAM)
        with raw, self._client_ctx.wrap_socket(raw, do_handshake_on_connect=False) as tls:

            def connect() -> None:
                tls.settimeout(self._idle)
                tls.connect((host, int(port)))
                tls.do_handshake()
                peer = self._peer_credentials(tls).peer_id
                if peer != sender:
                    raise AdmissionError(f"the listener at {offer.address} is {peer}, not {sender}")

            try:
                await self._in_thread(connect, tls)
            except (OSError, ValueError, HyphaError) as exc:
                raise _DirectUnavailableError(f"{offer.address}: {exc}") from exc
            try:
                await self._in_thread(lambda: _receive_blocking(tls, offer, sink), tls)
            except OSError as exc:
                raise TransferError(f"direct transfer from {offer.address} broke: {exc}") from exc

    async def _pull_stream(self, offer: m.TensorOffer, sender: str, sink: Sink) -> None:
        stream = await self._node.open_stream(sender, ids.TENSOR_PROTOCOL)
        try:
            with trio.fail_after(self._idle):
                await write_frame(
                    stream, m.StreamPullRequest(transfer_id=offer.transfer_id, token=offer.token)
                )
                _expect_go(await read_frame(stream), offer)
            remaining = offer.size
            chunks: list[bytes] = []
            while remaining > 0:
                try:
                    with trio.fail_after(self._idle):
                        chunk = await stream.read(min(remaining, CHUNK_BYTES))
                except trio.TooSlowError:
                    raise
                except Exception as exc:  # libp2p raises StreamEOF, StreamReset and friends
                    raise TransferError(f"stream from {sender} broke: {exc}") from exc
                if not chunk:
                    raise TransferError(f"stream from {sender} ended {remaining} bytes short")
                chunks.append(chunk)
                remaining -= len(chunk)
                if remaining == 0 or sum(map(len, chunks)) >= CHUNK_BYTES:
                    await trio.to_thread.run_sync(sink.write, *chunks, limiter=self._limiter)
                    chunks = []
            with trio.fail_after(self._idle):
                await write_frame(stream, sink.verdict(offer))
            sink.check(offer.sha256)
        except trio.TooSlowError as exc:
            raise TransferError(f"stream from {sender} stalled for {self._idle} s") from exc
        finally:
            await _close(stream)

    # --- shared -----------------------------------------------------------------------

    def _peer_credentials(self, tls: ssl.SSLSocket) -> PeerCredentials:
        der = tls.getpeercert(binary_form=True)
        if not der:
            raise AdmissionError("the peer presented no certificate")
        creds, _ = self._verifier.verify(x509.load_der_x509_certificate(der))
        return creds

    async def _in_thread(self, fn: Callable[[], T], sock: socket.socket) -> T:
        """Run a blocking loop on ``sock`` in a worker thread.

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
                results.append(await trio.to_thread.run_sync(fn, limiter=self._limiter))
            except BaseException as exc:  # re-raised below, outside the nursery's group
                errors.append(exc)
            finally:
                finished = True
                nursery.cancel_scope.cancel()
        if errors:
            raise errors[0]
        return results[0]


def _receive_blocking(tls: ssl.SSLSocket, offer: m.TensorOffer, sink: Sink) -> None:
    """Request, receive and confirm one transfer on a connected, verified TLS socket.

    This thread decrypts into one buffer while a ``HashingWriter`` thread hashes and writes
    the previous ones, so the two run on two cores.
    """
    tls.sendall(codec.encode_frame(m.StreamPullRequest(transfer_id=offer.transfer_id, token=offer.token)))
    _expect_go(_read_frame_blocking(tls), offer)
    with HashingWriter(sink, min(CHUNK_BYTES, max(offer.size, 1))) as writer:
        remaining = offer.size
        while remaining > 0:
            buffer = writer.buffer()
            length = min(len(buffer), remaining)
            _fill(tls, buffer[:length])
            writer.submit(buffer, length)
            remaining -= length
    tls.sendall(codec.encode_frame(sink.verdict(offer)))
    sink.check(offer.sha256)


def _expect_go(reply: m.Msg, offer: m.TensorOffer) -> None:
    if isinstance(reply, m.ErrorResponse):
        raise FinalTransferError(
            f"the sender refused transfer {offer.transfer_id}: {reply.code}: {reply.detail}"
        )
    if not isinstance(reply, m.TransferDone) or not reply.ok or reply.transfer_id != offer.transfer_id:
        raise ProtocolError(f"expected TransferDone for {offer.transfer_id}, got {reply}")


def _fill(sock: ssl.SSLSocket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        num = sock.recv_into(view[got:])
        if not num:
            raise TransferError(f"connection closed {len(view) - got} bytes short")
        got += num


def _read_frame_blocking(sock: ssl.SSLSocket) -> m.Msg:
    header = memoryview(bytearray(codec.HEADER.size))
    try:
        _fill(sock, header)
        body = memoryview(bytearray(codec.parse_header(bytes(header), codec.DEFAULT_MAX_BYTES)))
        _fill(sock, body)
        return codec.decode_body(bytes(body))
    except codec.ProtocolError as exc:
        raise ProtocolError(str(exc)) from exc


async def _close(stream: Stream) -> None:
    with trio.move_on_after(1.0) as scope:
        scope.shield = True
        with contextlib.suppress(Exception):  # the peer may be gone already
            await stream.close()


def _describe(path: Path, sha256: str | None) -> tuple[int, str]:
    size = path.stat().st_size
    if sha256 is None:
        with open(path, "rb") as f:
            sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    return size, sha256


def _listen_host(addresses: list[str]) -> str | None:
    """The host of the first ``/ip4`` or ``/ip6`` TCP multiaddr, if any."""
    for address in addresses:
        parts = address.split("/")
        if len(parts) >= 5 and parts[1] in ("ip4", "ip6") and parts[3] == "tcp":
            return parts[2]
    return None


def _advertised_host(host: str, external_addresses: list[str]) -> str | None:
    """The host others should dial: the bound one, or for a wildcard the first external one."""
    if host not in ("0.0.0.0", "::"):
        return host
    external = _listen_host(external_addresses)
    return external if external not in (None, "0.0.0.0", "::") else None


def _peername(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "unknown address"
    return f"{host}:{port}"
