"""Hypha: decentralized DiLoCo training over an authenticated peer-to-peer network."""

__version__ = "0.1.0"
