"""``BulkService``: the one object roles use to offer files to peers and pull offered files.

Owns wiring the bulk mechanisms of one node together (the offer registry, the direct TLS
channel and its handshake gate, the stream fallback, the pull with retries, the shared
counters and worker threads), starting the listener and the stream handler, and giving received files back
to the spares. It does not decide what to send or where to store it (roles do), nor how
offers travel (an RPC such as ``TensorPushRequest`` or ``WeightsRequest``).
"""

from __future__ import annotations

import secrets
from pathlib import Path

import trio

from hypha.errors import TransferError
from hypha.net.bulk.direct import DirectChannel
from hypha.net.bulk.gate import HandshakeGate
from hypha.net.bulk.offers import Offers, describe_file
from hypha.net.bulk.pull import Puller
from hypha.net.bulk.sockets import advertised_host, listen_host
from hypha.net.bulk.stats import BulkStatistics, Counters
from hypha.net.bulk.stream import StreamChannel
from hypha.net.host import Node
from hypha.net.spares import SpareFiles
from hypha.protocol import ids
from hypha.protocol import messages as m


class BulkService:
    """Offers files to peers and pulls offered files, over direct TLS or a libp2p stream.

    Args:
        node: the running node whose certificates and streams the service uses.
        backoff_seconds: delay before the first retry of a pull; it doubles per retry.
        idle_timeout_seconds: longest silence on a transfer before it counts as failed.
        max_threads: worker threads for byte loops and file I/O.
        spares: recycled files that pulls overwrite instead of creating new ones (see
            ``spares.py``); ``recycle`` gives files back to it.
        handshake_timeout_seconds: how long a connection to the direct listener has for its
            TLS handshake and first frame; anyone can connect, so this is short.
        max_handshakes: connections to the listener still handshaking at once; past it a
            new one is closed at once (``num_handshakes_refused``).
        max_handshakes_per_host: the same cap for the connections from one remote host.

    Raises:
        ValueError: a cap below 1 or a handshake timeout that is not positive.
    """

    def __init__(
        self,
        node: Node,
        *,
        backoff_seconds: float = 0.1,
        idle_timeout_seconds: float = 30.0,
        max_threads: int = 8,
        spares: SpareFiles | None = None,
        handshake_timeout_seconds: float = 5.0,
        max_handshakes: int = 64,
        max_handshakes_per_host: int = 16,
    ) -> None:
        self._node = node
        self._spares = spares
        self._limiter = trio.CapacityLimiter(max_threads)
        self._counters = Counters()
        self._offers = Offers(self._counters)
        self._gate = HandshakeGate(
            self._counters, max_handshakes=max_handshakes, max_per_host=max_handshakes_per_host
        )
        self._direct = DirectChannel(
            node.settings.tls,
            node.verifier,
            self._offers,
            self._limiter,
            idle_timeout_seconds,
            gate=self._gate,
            handshake_timeout_seconds=handshake_timeout_seconds,
        )
        self._stream = StreamChannel(node, self._offers, self._limiter, idle_timeout_seconds)
        self._puller = Puller(
            self._direct,
            self._stream,
            self._counters,
            self._limiter,
            backoff_seconds=backoff_seconds,
            spares=spares,
        )

    @property
    def address(self) -> str | None:
        """``host:port`` of the direct listener, or None when the node does not listen."""
        return self._direct.address

    def recycle(self, path: Path) -> None:
        """Done with ``path`` (a file received earlier): keep it for a later pull, or delete it."""
        if self._spares is None:
            Path(path).unlink(missing_ok=True)
        else:
            self._spares.give(path)

    def statistics(self) -> BulkStatistics:
        """Return a snapshot of the counters of both sides, pending offers, open handshakes."""
        return self._counters.snapshot(num_pending=len(self._offers), num_handshaking=len(self._gate))

    async def run(self, *, task_status: trio.TaskStatus[str | None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the stream fallback and, if the node listens, the direct TLS listener.

        The listener binds the host of the node's first IP listen address, on port 0, and
        reports its advertised ``host:port`` (or None) through ``task_status.started``.

        Cancellation: closes the listener and aborts the transfers it serves.
        """
        settings = self._node.settings
        self._node.set_stream_handler(ids.TENSOR_PROTOCOL, self._stream.serve)
        host = listen_host(settings.listen_addresses)
        if host is None:
            task_status.started(None)
            await trio.sleep_forever()
        public = advertised_host(host, settings.external_addresses)
        await self._direct.serve(host, public, task_status=task_status)

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
            size, digest = await trio.to_thread.run_sync(describe_file, path, sha256, limiter=self._limiter)
        except OSError as exc:
            raise TransferError(f"cannot offer {path}: {exc}") from exc
        offer = m.TensorOffer(
            transfer_id=secrets.token_hex(8),
            purpose=purpose,
            size=size,
            sha256=digest,
            token=secrets.token_hex(16),
            address=self._direct.address,
            name=name,
            job_id=job_id,
            task_id=task_id,
            round=round,
            samples=samples,
            encoding=encoding,
        )
        self._offers.add(offer, path, receiver, ttl_seconds)
        return offer

    def withdraw(self, transfer_id: str) -> bool:
        """Forget an offer; return whether it was still pending."""
        return self._offers.withdraw(transfer_id)

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
            ValueError: ``attempts`` is below 1.

        Cancellation: aborts the transfer and removes the temp file; ``dest`` is untouched.
        """
        return await self._puller.pull(offer, sender, dest, attempts=attempts)
