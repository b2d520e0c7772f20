"""A whole Hypha network on this machine: production code behind ``hypha up``.

``plan.py`` decides which job runs and where its files go, ``topology.py`` writes a fresh
PKI (``pki.py``) and one config per node, ``launch.py`` starts the nodes (one process per
role through ``children.py``, or all in this trio run), and ``logs.py`` sets up logging for
processes that host nodes. The test harness (``hypha.testing``) builds on this package;
nothing here imports ``hypha.testing`` or ``hypha.cli``. The names below are this package's
public API.
"""

from hypha.local.children import ChildNode, spawn_node, stop_process
from hypha.local.launch import run_single_process, start_processes
from hypha.local.logs import init_logging
from hypha.local.pki import Pki
from hypha.local.plan import DEMO_JOB, LocalPlan, ensure_dataset, logs_dir, make_plan, read_status
from hypha.local.topology import write_configs

__all__ = [
    "DEMO_JOB",
    "ChildNode",
    "LocalPlan",
    "Pki",
    "ensure_dataset",
    "init_logging",
    "logs_dir",
    "make_plan",
    "read_status",
    "run_single_process",
    "spawn_node",
    "start_processes",
    "stop_process",
    "write_configs",
]
