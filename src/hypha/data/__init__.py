"""Datasets: preparation into SafeTensors slices, the manifest, and the worker-side cache.

Names are loaded on first use, so that importing ``hypha.data.manifest`` (as ``training``
may) pulls in neither torch (``prepare``) nor trio (``cache``). This package does not serve
slices to peers (``datanode``) nor move bytes over the network (``net.bulk``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hypha.data.cache import CacheStatistics, Fetcher, SliceCache, SliceRef
    from hypha.data.manifest import (
        FORMAT_VERSION,
        MANIFEST_NAME,
        Manifest,
        SliceInfo,
        TensorInfo,
        load_manifest,
        manifest_sha256,
        sha256_file,
        slice_path,
        verify_slice,
    )
    from hypha.data.prepare import builtin_corpus_dir, prepare_builtin, prepare_dataset

_EXPORTS: dict[str, str] = {
    "CacheStatistics": "cache",
    "Fetcher": "cache",
    "SliceCache": "cache",
    "SliceRef": "cache",
    "FORMAT_VERSION": "manifest",
    "MANIFEST_NAME": "manifest",
    "Manifest": "manifest",
    "SliceInfo": "manifest",
    "TensorInfo": "manifest",
    "load_manifest": "manifest",
    "manifest_sha256": "manifest",
    "sha256_file": "manifest",
    "slice_path": "manifest",
    "verify_slice": "manifest",
    "builtin_corpus_dir": "prepare",
    "prepare_builtin": "prepare",
    "prepare_dataset": "prepare",
}

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "CacheStatistics",
    "Fetcher",
    "Manifest",
    "SliceCache",
    "SliceInfo",
    "SliceRef",
    "TensorInfo",
    "builtin_corpus_dir",
    "load_manifest",
    "manifest_sha256",
    "prepare_builtin",
    "prepare_dataset",
    "sha256_file",
    "slice_path",
    "verify_slice",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hypha.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"hypha.data.{module}"), name)
