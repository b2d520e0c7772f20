"""The exchange both bulk channels speak, and its constants.

The receiver sends a ``StreamPullRequest`` frame; the sender answers ``TransferDone(ok=True)``
and exactly ``size`` raw bytes, or an ``ErrorResponse``; the receiver confirms with
``TransferDone(ok=<sha256 matched>)``. Only a confirmed transfer consumes the token, so a
failed or corrupted attempt can be retried. This module owns the chunk sizes, the
``CHANGED`` refusal both senders send, and the receiver's check of the sender's answer. It
moves no bytes (``direct.py``, ``stream.py``) and keeps no offers (``offers.py``).
"""

from __future__ import annotations

from typing import Final, Literal

from hypha.errors import ProtocolError
from hypha.net.sink import FinalTransferError
from hypha.protocol import codec, codes
from hypha.protocol import messages as m

CHUNK_BYTES: Final = 4 * 1024 * 1024
"""Unit of file reads, socket writes and disk writes on the direct channel."""
STREAM_CHUNK_BYTES: Final = 1024 * 1024
"""Unit of libp2p stream writes (Yamux is fastest around 1 MiB)."""
FRAME_LIMIT_BYTES: Final = codec.DEFAULT_MAX_BYTES
"""Largest frame either side reads: the exchange's frames are small, so a peer announcing a
big one is refused before its body is buffered."""
CHANGED: Final = m.ErrorResponse(code=codes.CHANGED, detail="the file changed size since the offer")
"""The sender's answer when the offered file no longer has the offered size."""

Channel = Literal["direct", "stream"]
"""Which channel carried a transfer: the direct TLS socket or a libp2p stream."""


def pull_request(offer: m.TensorOffer) -> m.StreamPullRequest:
    """The receiver's first frame: which transfer, and the token that proves it may pull it."""
    return m.StreamPullRequest(transfer_id=offer.transfer_id, token=offer.token)


def expect_go(reply: m.Msg, offer: m.TensorOffer) -> None:
    """Check the sender's answer to a pull request before any byte of the file is read.

    Raises:
        FinalTransferError: the sender refused (retrying cannot help).
        ProtocolError: the answer is not the ``TransferDone`` of this transfer.
    """
    if isinstance(reply, m.ErrorResponse):
        raise FinalTransferError(
            f"the sender refused transfer {offer.transfer_id}: {reply.code}: {reply.detail}"
        )
    if not isinstance(reply, m.TransferDone) or not reply.ok or reply.transfer_id != offer.transfer_id:
        raise ProtocolError(f"expected TransferDone for {offer.transfer_id}, got {reply}")
