"""The job bridge: HTTP/1.1 on a Unix socket between a worker and one task's executor.

Exports the server (``serve_bridge``, ``BridgeApp``), the seam the worker implements
(``BridgeBackend``), the per-task queue of pushed files (``Inbox``) and the work-directory
path rule (``resolve_in``). Bodies are in ``hypha.protocol.bridge``; the executor-side
client is ``hypha.training.session``.
"""

from hypha.bridge.api import SSE_KEEPALIVE_SECONDS, BridgeBackend, openapi_document, resolve_in
from hypha.bridge.inbox import Inbox, InboxStatistics, Subscription
from hypha.bridge.server import MAX_BODY_BYTES, MAX_HEAD_BYTES, BridgeApp, BridgeStatistics, serve_bridge

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_HEAD_BYTES",
    "SSE_KEEPALIVE_SECONDS",
    "BridgeApp",
    "BridgeBackend",
    "BridgeStatistics",
    "Inbox",
    "InboxStatistics",
    "Subscription",
    "openapi_document",
    "resolve_in",
    "serve_bridge",
]
