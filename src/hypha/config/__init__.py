"""Node configuration: typed sections per role, loaded from TOML, environment and flags.

The names below are what other packages import: the section types (``schema.py``), loading
and checking (``load.py``) and the one TOML writer (``toml.py``). Job specs live in
``config.job``.
"""

from hypha.config.load import build_section, check_files, load_config, render_default
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
from hypha.config.toml import dumps, write_toml

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
    "build_section",
    "check_files",
    "dumps",
    "load_config",
    "render_default",
    "write_toml",
]
