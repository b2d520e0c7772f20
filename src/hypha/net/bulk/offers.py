"""The sender's registry of offers, and how it judges a pull request against them.

Owns the pending offers (file, receiver, one-time token, expiry), the refusals a sender
answers with (``codes.UNKNOWN_TRANSFER``, ``codes.FORBIDDEN``; ``CHANGED`` comes from
``exchange.py``), consuming a token once the receiver confirmed the bytes, and counting and
logging every refusal. It moves no bytes (``direct.py``, ``stream.py``) and reads a file
only to describe it for a new offer (``describe_file``).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

import trio

from hypha.net.bulk.exchange import CHANGED, Channel
from hypha.net.bulk.stats import Counters
from hypha.protocol import codes
from hypha.protocol import messages as m

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pending:
    """An offer waiting for its pull: what was offered, from which file, to whom, until when."""

    offer: m.TensorOffer
    path: Path
    receiver: str
    expires_at: float


class Offers:
    """Pending offers by transfer id; expired ones are dropped whenever the registry is used.

    Args:
        counters: where confirmed sends and refusals are counted.
    """

    def __init__(self, counters: Counters) -> None:
        self._pending: dict[str, Pending] = {}
        self._counters = counters

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, offer: m.TensorOffer, path: Path, receiver: str, ttl_seconds: float) -> None:
        """Register ``offer`` of ``path`` for one pull by ``receiver`` within ``ttl_seconds``."""
        self._purge()
        self._pending[offer.transfer_id] = Pending(offer, path, receiver, trio.current_time() + ttl_seconds)

    def withdraw(self, transfer_id: str) -> bool:
        """Forget an offer; return whether it was still pending."""
        return self._pending.pop(transfer_id, None) is not None

    def check(self, request: m.Msg, peer: str) -> Pending | m.ErrorResponse:
        """Match a pull request against the pending offers; refusals are counted and logged."""
        self._purge()
        pending = None
        if isinstance(request, m.StreamPullRequest):
            pending = self._pending.get(request.transfer_id)
            if pending is not None and not secrets.compare_digest(pending.offer.token, request.token):
                pending = None
        if pending is None:
            refusal = m.ErrorResponse(
                code=codes.UNKNOWN_TRANSFER, detail="no pending transfer with this id and token"
            )
        elif pending.receiver != peer:
            refusal = m.ErrorResponse(code=codes.FORBIDDEN, detail="the offer was made for another peer")
        else:
            return pending
        self.refused(peer, refusal.detail)
        return refusal

    def confirmed(self, pending: Pending, ack: m.Msg, peer: str, channel: Channel) -> None:
        """Consume the token if the receiver confirmed the bytes."""
        if isinstance(ack, m.TransferDone) and ack.ok:
            self._pending.pop(pending.offer.transfer_id, None)
            self._counters.transferred(pending.offer.size, channel, received=False)
        elif ack is CHANGED:
            self.refused(peer, CHANGED.detail)
        else:
            logger.warning("transfer %s to %s not confirmed: %s", pending.offer.transfer_id, peer, ack)

    def refused(self, peer: str, reason: object) -> None:
        """Count and log a request this sender refused (handshake, token, peer, changed file)."""
        self._counters.num_refused += 1
        logger.warning("refused bulk request from %s: %s", peer, reason)

    def _purge(self) -> None:
        now = trio.current_time()
        for transfer_id in [t for t, p in self._pending.items() if p.expires_at < now]:
            del self._pending[transfer_id]


def describe_file(path: Path, sha256: str | None) -> tuple[int, str]:
    """Size and sha256 of ``path`` (``sha256`` if given: the file is then not read).

    Blocking: runs in a worker thread.
    """
    size = path.stat().st_size
    if sha256 is None:
        with open(path, "rb") as f:
            sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    return size, sha256
