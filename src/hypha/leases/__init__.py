"""Leases: the ledger both workers and schedulers use to track who holds what until when."""

from hypha.leases.ledger import (
    Clock,
    Lease,
    LeaseKind,
    Ledger,
    LedgerStatistics,
    ResourceLedger,
    ResourceLedgerStatistics,
)

__all__ = [
    "Clock",
    "Lease",
    "LeaseKind",
    "Ledger",
    "LedgerStatistics",
    "ResourceLedger",
    "ResourceLedgerStatistics",
]
