"""``init_logging`` for the CLI; it lives in ``hypha.local.logs`` (shared with the harness).

Kept so that ``from hypha.cli.logs import init_logging`` (benchmarks) still works.
"""

from hypha.local.logs import init_logging

__all__ = ["init_logging"]
