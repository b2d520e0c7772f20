"""Gateway role."""

from hypha.gateway.node import run_gateway

__all__ = ["run_gateway"]
