"""The receiver's pull: channel choice, retries with backoff, and the checked destination.

Owns one pull from start to ``dest``: a ``Sink`` per attempt (a recycled spare when there is
one), the direct channel first when the offer names an address and the stream when it
cannot be used, the sha256 check before ``os.replace``, and retries with exponential backoff
for every failure but a final one (a refusal, an unwritable ``dest``). It speaks neither
channel's bytes itself (``direct.py``, ``stream.py``) and keeps no offers (``offers.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from hypha.errors import HyphaError, TransferError
from hypha.net.bulk.direct import DirectChannel, DirectUnavailableError
from hypha.net.bulk.exchange import Channel
from hypha.net.bulk.stats import Counters
from hypha.net.bulk.stream import StreamChannel
from hypha.net.sink import FinalTransferError, Sink
from hypha.net.spares import SpareFiles
from hypha.protocol import messages as m

logger = logging.getLogger(__name__)


class Puller:
    """Pulls offered files over the direct channel or the stream fallback, with retries.

    Args:
        direct: the direct TLS channel.
        stream: the stream fallback.
        counters: where retries, failures, reused spares and received bytes are counted.
        limiter: worker threads for file I/O.
        backoff_seconds: delay before the first retry; it doubles per retry.
        spares: recycled files to overwrite instead of creating new ones.
    """

    def __init__(
        self,
        direct: DirectChannel,
        stream: StreamChannel,
        counters: Counters,
        limiter: trio.CapacityLimiter,
        *,
        backoff_seconds: float,
        spares: SpareFiles | None,
    ) -> None:
        self._direct = direct
        self._stream = stream
        self._counters = counters
        self._limiter = limiter
        self._backoff = backoff_seconds
        self._spares = spares

    async def pull(self, offer: m.TensorOffer, sender: str, dest: Path, *, attempts: int) -> Path:
        """Fetch ``offer`` from ``sender`` into ``dest``; see ``BulkService.pull``."""
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        dest = Path(dest)
        delay = self._backoff
        last: HyphaError | None = None
        for attempt in range(attempts):
            if attempt:
                self._counters.num_retries += 1
                await trio.sleep(delay)
                delay *= 2
            try:
                channel = await self._pull_once(offer, sender, dest)
            except FinalTransferError:
                self._counters.num_failed += 1
                raise
            except HyphaError as exc:
                last = exc
                logger.warning(
                    "pull %s from %s failed (attempt %d of %d): %s",
                    *(offer.transfer_id, sender, attempt + 1, attempts, exc),
                )
                continue
            self._counters.transferred(offer.size, channel, received=True)
            return dest
        self._counters.num_failed += 1
        raise TransferError(
            f"transfer {offer.transfer_id} from {sender} failed after {attempts} attempts: {last}"
        ) from last

    async def _pull_once(self, offer: m.TensorOffer, sender: str, dest: Path) -> Channel:
        """One attempt; return the channel used."""
        sink = await trio.to_thread.run_sync(
            Sink.create, dest, offer.size, self._spares, limiter=self._limiter
        )
        try:
            channel: Channel = "stream"
            if offer.address:
                try:
                    await self._direct.pull(offer, sender, sink)
                    channel = "direct"
                except DirectUnavailableError as exc:
                    logger.info("direct channel to %s unavailable, using a stream: %s", sender, exc)
            if channel == "stream":
                await self._stream.pull(offer, sender, sink)
            await trio.to_thread.run_sync(sink.commit, limiter=self._limiter)
            self._counters.num_reused += sink.reused
            return channel
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(sink.discard, limiter=self._limiter)
