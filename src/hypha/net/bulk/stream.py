"""The stream fallback: the bulk exchange over a libp2p stream on ``/hypha/tensor/1``.

Used when the sender does not listen (behind NAT, reached through a gateway's relay
circuit) or its listener cannot be reached or authenticated. Owns the sender's stream
handler and the receiver's read loop. It opens no connections or circuits itself
(``Node.open_stream`` does), judges no requests (``offers.py``) and does not retry
(``pull.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os

import trio

from hypha.errors import HyphaError, TransferError
from hypha.net.bulk.exchange import (
    CHANGED,
    CHUNK_BYTES,
    FRAME_LIMIT_BYTES,
    STREAM_CHUNK_BYTES,
    expect_go,
    pull_request,
)
from hypha.net.bulk.offers import Offers
from hypha.net.host import Node
from hypha.net.rpc import Stream, read_frame, write_frame
from hypha.net.sink import Sink
from hypha.protocol import ids
from hypha.protocol import messages as m

logger = logging.getLogger(__name__)


class StreamChannel:
    """Both ends of the stream fallback of one node.

    Args:
        node: the node whose streams carry the bytes.
        offers: the sender's registry that judges incoming requests.
        limiter: worker threads for disk writes.
        idle_timeout_seconds: longest silence on a stream before it counts as failed.
    """

    def __init__(
        self,
        node: Node,
        offers: Offers,
        limiter: trio.CapacityLimiter,
        idle_timeout_seconds: float,
    ) -> None:
        self._node = node
        self._offers = offers
        self._limiter = limiter
        self._idle = idle_timeout_seconds

    async def serve(self, stream: Stream, peer: str) -> None:
        """The sender's handler of one ``/hypha/tensor/1`` stream from ``peer``."""
        try:
            with trio.fail_after(self._idle):
                decision = self._offers.check(await read_frame(stream, FRAME_LIMIT_BYTES), peer)
            if isinstance(decision, m.ErrorResponse):
                with trio.fail_after(self._idle):
                    await write_frame(stream, decision)
                return
            remaining = decision.offer.size
            async with await trio.open_file(decision.path, "rb") as f:
                if await f.seek(0, os.SEEK_END) != remaining:
                    await write_frame(stream, CHANGED)
                    self._offers.confirmed(decision, CHANGED, peer, "stream")
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
                self._offers.confirmed(decision, await read_frame(stream, FRAME_LIMIT_BYTES), peer, "stream")
        except (HyphaError, trio.TooSlowError) as exc:
            logger.warning("stream transfer to %s failed: %s", peer, exc or "timeout")
        finally:
            await close_stream(stream)

    async def pull(self, offer: m.TensorOffer, sender: str, sink: Sink) -> None:
        """Receive ``offer`` from ``sender`` over a stream (through a relay if need be).

        Raises:
            NetworkError: ``sender`` cannot be reached.
            TransferError: the stream broke or stalled, or the sha256 did not match.
        """
        stream = await self._node.open_stream(sender, ids.TENSOR_PROTOCOL)
        try:
            with trio.fail_after(self._idle):
                await write_frame(stream, pull_request(offer))
                expect_go(await read_frame(stream, FRAME_LIMIT_BYTES), offer)
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
            await close_stream(stream)


async def close_stream(stream: Stream) -> None:
    """Close ``stream`` within a second, shielded; a peer that is gone already is fine."""
    with trio.move_on_after(1.0) as scope:
        scope.shield = True
        with contextlib.suppress(Exception):  # the peer may be gone already
            await stream.close()
