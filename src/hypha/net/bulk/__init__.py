"""Bulk transfers: large files offered by a sender and pulled by their receiver.

The sender registers an offer (size, sha256, one-time token, its direct ``host:port``); the
receiver pulls it over a direct mutual-TLS socket, or over a libp2p stream (through a relay
when the sender does not listen), checks the sha256 while writing and retries. One
mechanism per module: ``exchange`` (the frames both channels speak), ``offers`` (the
sender's registry), ``direct`` (the TLS channel), ``gate`` (the caps on its connections
still handshaking), ``stream`` (the fallback), ``pull``
(retries, channel choice), ``sockets`` (blocking socket helpers), ``stats`` (counters) and
``service`` (``BulkService``, which wires them together). Other packages import from here.
"""

from hypha.net.bulk.exchange import CHANGED, CHUNK_BYTES, STREAM_CHUNK_BYTES
from hypha.net.bulk.service import BulkService
from hypha.net.bulk.stats import BulkStatistics

__all__ = ["CHANGED", "CHUNK_BYTES", "STREAM_CHUNK_BYTES", "BulkService", "BulkStatistics"]
