"""Node configuration: typed sections per role, loaded from TOML, environment and flags."""

from hypha.config.load import check_files, load_config, render_default
from hypha.config.schema import (
    ROLE_CONFIGS,
    ClientNetworkSection,
    DataConfig,
    ExecutorSection,
    GatewayConfig,
    NetworkSection,
    OfferSection,
    ResourcesSection,
    SchedulerConfig,
    WorkerConfig,
)

__all__ = [
    "ROLE_CONFIGS",
    "ClientNetworkSection",
    "DataConfig",
    "ExecutorSection",
    "GatewayConfig",
    "NetworkSection",
    "OfferSection",
    "ResourcesSection",
    "SchedulerConfig",
    "WorkerConfig",
    "check_files",
    "load_config",
    "render_default",
]
