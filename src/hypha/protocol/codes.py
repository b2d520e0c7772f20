"""Stable error codes carried in ``ErrorResponse.code`` on the wire.

They are part of the protocol: renaming a Python exception class must never change what a
peer reads, so each code is a constant here and ``hypha.errors`` maps its classes onto them.
Imports nothing from hypha.
"""

from __future__ import annotations

from typing import Final

# Refusals by the RPC layer itself.
BAD_REQUEST: Final = "bad_request"
TIMEOUT: Final = "timeout"
UNSUPPORTED: Final = "unsupported"
FORBIDDEN: Final = "forbidden"
INTERNAL: Final = "internal"
TOO_MANY_BYTES: Final = "too_many_bytes"
"""The peer has too many request bytes being read at once; it may retry with fewer."""

# Bulk channel refusals.
UNKNOWN_TRANSFER: Final = "unknown"
CHANGED: Final = "changed"

# A handler raised one of Hypha's errors (see ``hypha.errors.wire_code``).
ERROR: Final = "error"
CONFIG_ERROR: Final = "config_error"
PROTOCOL_ERROR: Final = "protocol_error"
ADMISSION_ERROR: Final = "admission_error"
NETWORK_ERROR: Final = "network_error"
PEER_UNREACHABLE: Final = "peer_unreachable"
REQUEST_TIMEOUT: Final = "request_timeout"
REMOTE_ERROR: Final = "remote_error"
TRANSFER_ERROR: Final = "transfer_error"
LEASE_ERROR: Final = "lease_error"
DATA_ERROR: Final = "data_error"
JOB_ERROR: Final = "job_error"
EXECUTOR_START: Final = "executor_start"
NOT_READY: Final = "not_ready"
CHECKPOINT_ERROR: Final = "checkpoint_error"
