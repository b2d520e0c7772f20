"""Logging setup for processes that run nodes: our format, and libp2p's noise kept out of the way.

Owns the only handler installation in Hypha. The CLI calls ``init_logging`` once per
process, and so do the harness entry points that host nodes without the CLI
(``hypha.testing.peer``, ``hypha.testing.workers``, benchmarks); library code never does.
It lives here, not in ``cli/``, so those need not import the CLI. py-libp2p logs normal
stream closes at WARNING and some modules log through the root logger; those lines are
dropped unless ``verbose``.
"""

from __future__ import annotations

import logging
import sys

_NOISY_MESSAGES = (
    "Failed to read DHT message",
    "Error getting transport addresses",
    "Error reading from hop stream",
)


class _Libp2pNoise(logging.Filter):
    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self._verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if self._verbose:
            return True
        if record.name.startswith("libp2p") or "/libp2p/" in record.pathname:
            return record.levelno >= logging.CRITICAL
        message = record.getMessage()
        return not any(noise in message for noise in _NOISY_MESSAGES)


def init_logging(role: str, *, verbose: bool = False, quiet: bool = False) -> None:
    """Send ``hypha`` logs to stderr with the role in each line; silence libp2p chatter."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)-7s {role} %(name)s: %(message)s", "%H:%M:%S")
    )
    handler.addFilter(_Libp2pNoise(verbose))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("hypha").setLevel(level)
    libp2p = logging.getLogger("libp2p")
    libp2p.handlers.clear()
    libp2p.setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    libp2p.propagate = True
    for name in ("hypercorn.error", "hypercorn.access"):
        logging.getLogger(name).setLevel(logging.WARNING)
